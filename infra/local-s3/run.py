"""A local S3-compatible endpoint for development and tests: moto's server on 127.0.0.1 with one bucket.

    python infra/local-s3/run.py [--port 9000] [--bucket pfsr-dev]

prints the `export AWS_...` lines that point boto3, pyarrow, the AWS CLI and Ray workers at it, then a
`# ready: ...` line, and serves until Ctrl-C / SIGTERM. In the background:

    python infra/local-s3/run.py --port 9000 > local-s3.env &
    until grep -q '^# ready' local-s3.env; do sleep 0.2; done; source <(grep ^export local-s3.env)

Objects live in memory and are gone when the server stops. Port 0 picks a free port.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import socket
import sys
import threading

# moto accepts any credentials; fixed ones so that the printed environment is reproducible.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def environment(url: str, region: str) -> dict[str, str]:
    """The standard AWS settings that boto3, pyarrow.fs.S3FileSystem and the AWS CLI read."""
    return {"AWS_ENDPOINT_URL": url, **CREDENTIALS, "AWS_DEFAULT_REGION": region, "AWS_REGION": region,
            # No instance metadata service here: without this, botocore probes 169.254.169.254 and waits.
            "AWS_EC2_METADATA_DISABLED": "true"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="bind address (keep it local: the server has no auth)")
    p.add_argument("--port", type=int, default=9000, help="0 = any free port")
    p.add_argument("--bucket", action="append", default=None, help="bucket to create (repeatable; default pfsr-dev)")
    p.add_argument("--region", default="us-east-1")
    args = p.parse_args(argv)

    import boto3
    from moto.server import ThreadedMotoServer

    port = args.port or _free_port(args.host)
    server = ThreadedMotoServer(ip_address=args.host, port=port, verbose=False)
    try:
        server.start()
    except OSError as e:  # port taken
        print(f"local-s3: cannot listen on {args.host}:{port}: {e}", file=sys.stderr)
        return 2
    url = f"http://{args.host}:{port}"
    env = environment(url, args.region)
    s3 = boto3.client("s3", endpoint_url=url, region_name=args.region, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    buckets = args.bucket or ["pfsr-dev"]
    for bucket in buckets:
        s3.create_bucket(Bucket=bucket)

    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    print(f"# ready: {url} buckets {' '.join('s3://' + b for b in buckets)}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
