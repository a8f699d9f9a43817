"""The README's generated sections: the configuration reference is current, the benchmark table is built from
the results' own goals."""
from __future__ import annotations

import json
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
        "gpu": {"goal_speedup": ">= 50"}}))
    (tmp_path / "plain.json").write_text(json.dumps({"images_per_s": 3.25, "nested": {"p99_ms": 12.0}}))
    rows = headline(json.loads((tmp_path / "scaling.json").read_text()))
    assert ("ratio", "1.75", ">= 1.7") in rows
    assert ("gpu.speedup", "not measured", ">= 50") in rows  # a goal without a figure says so
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
