"""The whole pipeline through S3 and `ray job submit` (issue 7): scripts/e2e_s3.sh with its own local S3 endpoint
(infra/local-s3) and its own `ray start --head`, run as a user runs it. Data prep of scikit-image's photos to
s3://, training from the S3 shards with checkpoints to S3, export, evaluation of the S3 checkpoint; every job must
end SUCCEEDED and the metrics.json read back from S3 must hold issue 6's figures.

Kept small for 2 shared cores: 10 steps of configs/tiny.yaml on 2 workers, two 192x192 validation crops with the
4-step sampler (a few minutes, most of it Ray start-up and the runtime environment of the first job).
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "scripts" / "e2e_s3.sh"
JOBS = ["prep-train", "prep-val", "train", "export", "evaluate"]
QUALITY = {"psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "lpips"}
TIMEOUT_S = 900  # a generous bound for a loaded machine; a hang fails here instead of stalling `make test`


def _our_processes(work: str) -> list[str]:
    """Running processes that belong to the script's work directory: Ray's name their session directory below it,
    the S3 endpoint and `ray start` write their output there."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            files = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:  # gone meanwhile
            continue
        if work in cmdline or any(f.startswith(work + "/") for f in files):
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@pytest.fixture(scope="module")
def e2e_run() -> tuple[int, str]:
    """(exit code, output) of scripts/e2e_s3.sh. Its own S3 endpoint, Ray head (own ports, temp dir, auth token)
    and the venv's tools on PATH; the test session's AWS_* and RAY_* settings are not passed on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", "STEPS": "10",
            "WORKERS": "2", "KEEP": "0"}
    # A session of its own: on a timeout the whole group gets SIGTERM, on which the script stops its head and
    # endpoint, as on Ctrl-C.
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"scripts/e2e_s3.sh did not finish in {TIMEOUT_S} s:\n{output[-4000:]}")
    print(output)  # shown by pytest on failure: the per-job lines and their seconds
    return proc.returncode, output


def test_every_job_succeeds(e2e_run):
    code, output = e2e_run
    assert code == 0, output[-4000:]
    statuses = re.findall(r"^e2e: job ([\w-]+): ([A-Z]+) \(\d+ s\)$", output, re.M)
    assert statuses == [(job, "SUCCEEDED") for job in JOBS], output[-4000:]
    assert output.rstrip().endswith("e2e: all jobs SUCCEEDED")


def test_metrics_read_back_from_s3(e2e_run):
    code, output = e2e_run
    lines = re.findall(r"^e2e: metrics\.json (\{.*\})$", output, re.M)
    assert code == 0 and len(lines) == 1, output[-4000:]
    report = json.loads(lines[0])
    assert (report["n_images"], report["scale"], report["sampler"], report["steps"]) == (2, 4, "dpmpp_2m", 4)
    assert set(report["model"]) == QUALITY | {"nfe", "seconds_per_image"}
    assert set(report["bicubic"]) == QUALITY
    assert report["model"]["nfe"] == 4 and report["model"]["seconds_per_image"] > 0
    # x4 bicubic on crops of chelsea: the range known for photos
    assert 20 < report["bicubic"]["psnr_y"] < 40, report["bicubic"]
    for section in ("model", "bicubic"):
        figures = report[section]
        assert all(math.isfinite(figures[k]) for k in ("psnr_y", "psnr_rgb", "ssim_y", "ssim_rgb")), figures
        assert 0 < figures["ssim_y"] <= 1 and 0 < figures["ssim_rgb"] <= 1, figures
        # null (with the reason) where no VGG backbone is found, never a stand-in number
        assert figures["lpips"] is None or figures["lpips"] >= 0, figures
    # 10 training steps make no good model, but its output is an image of the scene, not noise
    assert report["model"]["psnr_y"] > 10, report["model"]


def test_script_leaves_nothing_running(e2e_run):
    """The S3 endpoint and the Ray head (with its raylet, GCS, workers) are stopped; the work directory is gone."""
    code, output = e2e_run
    work = re.search(r"^e2e: work directory (\S+)$", output, re.M).group(1)
    deadline = time.monotonic() + 30  # stragglers of Ray's own shutdown
    while _our_processes(work) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _our_processes(work), _our_processes(work)
    assert not Path(work).exists()
