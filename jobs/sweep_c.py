"""`pfsr sweep-c` as a Ray job: ray job submit --working-dir . -- python jobs/sweep_c.py --config FILE --data URI ...

Puts the checkout's platform/ on sys.path, so it runs without installing the package.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from pfsr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep-c", *sys.argv[1:]]))
