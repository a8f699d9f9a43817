"""Whole photos of 1024 x 768 output pixels through `pfsr upscale`, `pfsr evaluate` and one HTTP request to
`pfsr serve`, each process's peak memory measured and held under serve.memory_budget_mb; a replica killed for
memory ends `pfsr evaluate` with a clear error instead of restarting without end."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pfsr import cli
from pfsr.config import ServeConfig
from pfsr.degradation import degrade, to_uint8

pytestmark = pytest.mark.ray

ROOT = Path(__file__).parents[1]
# The default budget. Tiles of configs/tiny.yaml at serve.tile = 128 need ~0.6 GB each: they are solved one at a
# time (all six together would need ~4 GB).
BUDGET_MB = ServeConfig.memory_budget_mb
FAST = ["--sampler", "dpmpp_2m", "--steps", "1"]
TILES = 6  # 256 x 192 LR in tiles of at most 128 overlapping by 16: 3 x 2 tiles of 96 x 104


@pytest.fixture(scope="module")
def photo(photos, tmp_path_factory) -> dict[str, Path]:
    """scikit-image's rocket, 4:3, as a 1024 x 768 HR PNG (in a folder of its own) and its 256 x 192 LR PNG."""
    root = tmp_path_factory.mktemp("whole")
    rocket = photos["rocket"]  # 427 x 640
    hr = np.asarray(Image.fromarray(rocket[:, 35:604]).resize((1024, 768), Image.BICUBIC))
    (root / "hr").mkdir()
    Image.fromarray(hr).save(root / "hr" / "rocket.png")
    lr = to_uint8(degrade(torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255, 4))[0].permute(1, 2, 0).numpy()
    Image.fromarray(lr).save(root / "rocket_lr.png")
    return {"hr_dir": root / "hr", "lr": root / "rocket_lr.png"}


def test_upscale_cli_holds_the_budget(photo, tiny_checkpoint, tmp_path):
    out = tmp_path / "rocket_x4.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "platform")}
    # a parent of its own reports the peak RSS of its one child, `pfsr upscale`
    measure = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print('peak_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "pfsr", "upscale", str(photo["lr"]),
                          str(out), "--checkpoint", str(tiny_checkpoint), *FAST, "--device", "cpu",
                          "--memory-budget-mb", str(BUDGET_MB)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    peak_mb = int(run.stdout.split("peak_kb")[-1]) / 1024
    assert Image.open(out).size == (1024, 768)
    assert f"{TILES}/{TILES}" in run.stderr  # the progress bar of the tiles
    assert "1024x768" in run.stdout
    assert peak_mb <= BUDGET_MB, peak_mb


def test_evaluate_holds_the_budget_per_replica(ray_cluster, photo, tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(photo["hr_dir"]), "--out",
                     str(out), *FAST, "--memory-budget-mb", str(BUDGET_MB)]) == 0
    (row,) = pq.read_table(out / "per_image.parquet").to_pylist()
    assert (row["width"], row["height"], row["nfe"]) == (1024, 768, TILES)
    assert row["bicubic_psnr_y"] > 25 and row["rrdb_psnr_y"] > 10  # the tiled RRDB baseline ran on the whole photo
    assert 0 < row["peak_rss_mb"] <= BUDGET_MB, row["peak_rss_mb"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers_of_this_session(title: str) -> list[int]:
    """PIDs of this pytest session's Ray workers (descendants of this process: its raylet's children) whose
    process title holds `title`; other sessions' clusters on the machine are never touched."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if title not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            pid, ancestors = int(proc.name), []
            while pid > 1 and len(ancestors) < 8:
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                ancestors.append(pid)
        except (OSError, ValueError, IndexError):
            continue
        if os.getpid() in ancestors:
            found.append(int(proc.name))
    return found


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def test_serve_request_holds_the_budget(ray_cluster, photo, tiny_checkpoint):
    from ray import serve

    from pfsr.pipeline.serve import build_app

    cfg = ServeConfig(max_pixels=512 * 512, memory_budget_mb=BUDGET_MB, max_seconds=600, min_replicas=1,
                      max_replicas=1, token_env="PFSR_UNSET_TOKEN")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(str(tiny_checkpoint), cfg), name="pfsr-whole", route_prefix="/whole")
        r = httpx.post(f"http://127.0.0.1:{port}/whole/upscale", content=photo["lr"].read_bytes(),
                       params={"sampler": "dpmpp_2m", "steps": "1"}, headers={"Content-Type": "image/png"},
                       timeout=600)
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).size == (1024, 768) and r.headers["X-PFSR-NFE"] == str(TILES)
        (replica,) = _workers_of_this_session("ServeReplica:pfsr-whole")
        peak = _peak_rss_mb(replica)
        assert peak <= BUDGET_MB, peak
    finally:
        serve.delete("pfsr-whole")
        serve.shutdown()


def test_a_replica_killed_for_memory_ends_evaluate_with_a_clear_error(ray_cluster, photo, tiny_checkpoint, tmp_path,
                                                                     capsys):
    """The kernel's OOM killer sends SIGKILL: so does this test, to every evaluation replica that comes up, while
    `pfsr evaluate --max-restarts 1` runs. It must stop after two deaths with a message that says what to lower."""
    killed: list[int] = []
    done = threading.Event()

    def killer():  # at most 4 kills: without the bound on restarts, evaluate then finishes and the test fails
        while not done.is_set() and len(killed) < 4:
            for pid in _workers_of_this_session("SRReplica"):
                if pid not in killed:
                    time.sleep(1.0)  # inside its first batch
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    except ProcessLookupError:
                        pass
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        code = cli.main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(photo["hr_dir"]), "--out",
                         str(tmp_path / "eval"), *FAST, "--max-restarts", "1"])
    finally:
        done.set()
        thread.join()
    err = capsys.readouterr().err
    assert code == 2 and "died 2 times" in err and "--memory-budget-mb" in err, err
    assert len(killed) == 2 and time.perf_counter() - t0 < 300
    assert not (tmp_path / "eval" / "metrics.json").exists()
