"""Rewrite the configuration reference in README.md from the config dataclasses (pfsr.config).

    python scripts/gen_config_reference.py           # or: make docs
    python scripts/gen_config_reference.py --check   # exit 1 when README.md is stale (tests/test_docs.py)
"""
from __future__ import annotations

import argparse
import sys

from pfsr.docs import README, config_reference_section, replace_section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="README.md configuration reference from pfsr.config")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when the section is stale")
    args = parser.parse_args(argv)
    text = README.read_text()
    updated = replace_section(text, "config-reference", config_reference_section())
    if updated == text:
        print(f"{README.name}: configuration reference is current")
        return 0
    if args.check:
        print(f"{README.name}: configuration reference is stale; run `make docs`", file=sys.stderr)
        return 1
    README.write_text(updated)
    print(f"{README.name}: configuration reference rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
