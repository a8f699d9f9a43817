"""The README's generated sections: the configuration reference is current, the benchmark table is built from
the results' own goals."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pfsr import config
from pfsr.docs import README, bench_table, config_reference_section, headline, replace_section, section

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_reference_is_current():
    assert section(README.read_text(), "config-reference") == config_reference_section(), \
        "README.md's configuration reference is stale: run `make docs`"
    proc = subprocess.run([sys.executable, "scripts/gen_config_reference.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_config_reference_lists_every_field_with_its_comment():
    table = config_reference_section()
    for section_field in config.Config.__dataclass_fields__.values():
        cls = section_field.default_factory().__class__
        for name in cls.__dataclass_fields__:
            assert f"`{section_field.name}.{name}`" in table
    # the comment beside a field in config.py becomes its meaning; Literal types read as their choices
    assert "| `diffusion.hybrid_c` | `float` | `1.0` | lambda(t) = abar(t)^c" in table
    assert "`'residual' \\| 'hr'`" in table


def test_replace_section_round_trip_and_missing_markers():
    text = README.read_text()
    replaced = replace_section(text, "benchmarks", "new body")
    assert section(replaced, "benchmarks") == "new body"
    assert replaced.replace("new body", section(text, "benchmarks")) == text
    with pytest.raises(ValueError, match="config-reference"):
        replace_section("# no markers here\n", "config-reference", "x")


def test_bench_table_pairs_figures_with_their_goals(tmp_path):
    (tmp_path / "scaling.json").write_text(json.dumps({
        "benchmark": "scaling", "machine": "2 cores of Test CPU, no GPU", "measured": "2026-01-02",
        "samples_per_s": {"1": 10.0, "2": 17.5}, "ratio": 1.75, "goal_ratio": ">= 1.7",
        "gpu": {"goal_speedup": ">= 50"},
        "memory": {"growth_100_over_10": {"adjoint": 0.99, "direct": 9.6}, "goal_adjoint_growth_at_most": 1.1,
                   "goal_met": True}}))
    (tmp_path / "plain.json").write_text(json.dumps({"images_per_s": 3.25, "nested": {"p99_ms": 12.0}}))
    rows = headline(json.loads((tmp_path / "scaling.json").read_text()))
    assert ("ratio", "1.75", ">= 1.7") in rows
    assert ("gpu.speedup", "not measured", ">= 50") in rows  # a goal without a figure says so
    # a goal named differently from its figure: the number whose path shares its words; goal_met shown with it
    assert ("memory.growth_100_over_10.adjoint", "0.99", "<= 1.1 (met)") in rows
    table = bench_table(tmp_path)
    assert "| scaling | `ratio` | 1.75 | >= 1.7 | 2 cores of Test CPU, no GPU | 2026-01-02 |" in table
    assert "| plain | `images_per_s` | 3.25 |  | not recorded |  |" in table  # no goals: the numbers


def test_readme_keeps_every_section_people_look_for():
    text = README.read_text()
    for heading in ("## Quick start", "## What the demo does", "## Architecture", "## Run on a cluster",
                    "## Configuration reference", "## Benchmarks", "## Known limits", "## Licences"):
        assert heading in text
    assert "make demo" in text and "make test" in text
    assert "```mermaid" in text


def test_run_all_runs_each_benchmark_stamps_it_and_rewrites_the_table(tmp_path):
    """bench/run_all.py on a copy of itself beside two scripts: one writes its result, one fails."""
    bench = tmp_path / "bench"
    (bench / "results").mkdir(parents=True)
    (bench / "run_all.py").write_text((ROOT / "bench" / "run_all.py").read_text())
    (bench / "echo_bench.py").write_text(
        "import json, pathlib\n"
        "result = {'benchmark': 'echo_bench', 'images_per_s': 12.5, 'goal_images_per_s': '>= 10'}\n"
        "pathlib.Path(__file__).with_name('results').joinpath('echo_bench.json').write_text(json.dumps(result))\n"
        "print(json.dumps(result))\n")
    (bench / "broken_bench.py").write_text("raise SystemExit(3)\n")
    readme = tmp_path / "README.md"
    readme.write_text(replace_section(README.read_text(), "benchmarks", "stale"))
    proc = subprocess.run([sys.executable, str(bench / "run_all.py"), "--readme", str(readme)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one script failed, and says so
    assert re.search(r"broken_bench\s+exit code 3", proc.stdout) and re.search(r"echo_bench\s+ok", proc.stdout)
    result = json.loads((bench / "results" / "echo_bench.json").read_text())
    assert result["machine"].endswith("GPU") and " cores of " in result["machine"] and result["measured"]
    table = section(readme.read_text(), "benchmarks")
    assert f"| echo_bench | `images_per_s` | 12.5 | >= 10 | {result['machine']} | {result['measured']} |" in table
    assert readme.read_text().replace(table, "") == README.read_text().replace(section(README.read_text(),
                                                                                          "benchmarks"), "")
