"""Benchmarks keep stdout for their one JSON object: logs, prints, Ray's and child processes' output go to stderr."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name not in ("_common.py", "run_all.py"))


def test_run_benchmark_sends_everything_but_the_json_to_stderr(tmp_path):
    """A main() that prints, logs, writes to file descriptor 1 and starts a child that prints (as `pfsr prep` inside
    bench/loader.py does): stdout is the returned object alone."""
    script = tmp_path / "noisy_bench.py"
    script.write_text(textwrap.dedent(f"""
        import logging, os, subprocess, sys
        sys.path.insert(0, {str(BENCH)!r})
        from _common import run_benchmark

        def main():
            print("a progress line")
            logging.basicConfig(level=logging.INFO)
            logging.getLogger("bench").info("a log line")
            os.write(1, b"straight to fd 1\\n")
            subprocess.run([sys.executable, "-c", "print('prep: a child line')"], check=True)
            return {{"benchmark": "noisy", "value": 1.5}}

        run_benchmark(main)
        print("after", file=sys.stderr)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == {"benchmark": "noisy", "value": 1.5}
    for line in ("a progress line", "a log line", "straight to fd 1", "prep: a child line", "after"):
        assert line in proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_benchmark_runs_through_run_benchmark_and_prints_to_stderr(script):
    tree = ast.parse(script.read_text())
    main_block = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert main_block and "run_benchmark(" in ast.unparse(main_block[0]), f"{script.name}: __main__ without run_benchmark"
    prints = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "print"]
    assert all(any(k.arg == "file" for k in call.keywords) for call in prints), f"{script.name}: print to stdout"


def test_sampler_time_stdout_is_its_json(tmp_path):
    """The cheapest benchmark at a tiny size, run as `make bench` runs it: stdout parses as one JSON object, the
    same as the file it writes; its log lines are on stderr."""
    out = tmp_path / "sampler_time.json"
    proc = subprocess.run([sys.executable, str(BENCH / "sampler_time.py"), "--batch", "1", "--hr-size", "16",
                           "--sde-steps", "2", "--few-steps", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text()) and result["benchmark"] == "sampler_time"
    assert "pf_ode" in proc.stderr and "unipc" in proc.stderr
