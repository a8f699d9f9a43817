"""`pfsr evaluate` as a Ray job:
ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . -- python jobs/evaluate.py \
    --checkpoint s3://BUCKET/models/x4.pt --data s3://BUCKET/shards/val --out s3://BUCKET/eval/dpmpp_2m_10 ...

Puts the checkout's platform/ on sys.path, so it runs without installing the package.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from pfsr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
