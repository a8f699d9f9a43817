"""Run every benchmark, then rewrite the README's benchmark table from bench/results/*.json.

Each bench/*.py runs in its own process, prints one JSON object and writes bench/results/<name>.json; this adds
"measured" (the date) and, when the result does not name it, "machine" (cores, CPU, GPU). A failing or timed-out
script is reported and the others still run; the exit code is 1 when any failed.

    python bench/run_all.py                      # all (make bench)
    python bench/run_all.py --only loader        # some
    python bench/run_all.py --table-only         # rewrite the README table from the results already there
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pfsr.docs import README, benchmarks_section, replace_section
from pfsr.report import describe_machine, machine_info

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def scripts(only: list[str], skip: list[str]) -> list[Path]:
    found = sorted(p for p in BENCH.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))
    unknown = set(only) - {p.stem for p in found}
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(sorted(unknown))}; have {', '.join(p.stem for p in found)}")
    return [p for p in found if (not only or p.stem in only) and p.stem not in skip]


def run(script: Path, timeout_s: float, machine: str) -> tuple[str, float]:
    """Run one benchmark (output streamed); stamp the machine into its result. -> (status, seconds)."""
    print(f"\n== bench/{script.name} ==", flush=True)
    t0 = time.perf_counter()
    try:
        code = subprocess.run([sys.executable, str(script)], cwd=BENCH.parent, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    result_file = RESULTS / f"{script.stem}.json"
    if code != 0:
        return f"exit code {code}", seconds
    if not result_file.is_file() or result_file.stat().st_mtime < time.time() - seconds - 1:
        return f"wrote no {result_file.relative_to(BENCH.parent)}", seconds
    result = json.loads(result_file.read_text())
    if isinstance(result, dict):
        result.setdefault("machine", machine)
        result["measured"] = time.strftime("%Y-%m-%d")
        result_file.write_text(json.dumps(result, indent=2) + "\n")
    return "ok", seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run bench/*.py and rewrite the README benchmark table")
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME", help="run only these (file stems)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="NAME")
    parser.add_argument("--table-only", action="store_true", help="do not run anything; rewrite the table")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    parser.add_argument("--readme", type=Path, default=README, help="the README whose table is rewritten")
    args = parser.parse_args(argv)

    statuses = {}
    if not args.table_only:
        machine = describe_machine(machine_info())
        print(f"benchmarks on {machine}", flush=True)
        for script in scripts(args.only, args.skip):
            statuses[script.stem] = run(script, args.timeout, machine)
    args.readme.write_text(replace_section(args.readme.read_text(), "benchmarks", benchmarks_section(RESULTS)))
    print(f"\n{args.readme}: benchmark table rewritten from {len(list(RESULTS.glob('*.json')))} results", flush=True)
    for name, (status, seconds) in statuses.items():
        print(f"  {name:20s} {status} ({seconds:.0f} s)")
    return 0 if all(status == "ok" for status, _ in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
