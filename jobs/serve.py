"""`pfsr serve` as a Ray job (blocks until stopped): ray job submit --working-dir . -- python jobs/serve.py \
    --checkpoint s3://BUCKET/models/x4.pt --host 0.0.0.0 --port 8000
For a managed deployment use `serve deploy cluster/serve.yaml` instead.

Puts the checkout's platform/ on sys.path, so it runs without installing the package.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from pfsr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
