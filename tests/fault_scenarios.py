"""Node-loss scenarios on a LocalCluster (tests/multinode.py): each runs the product's CLI as a driver on the head,
kills a worker node at a defined point, and returns its figures (steps redone, samples lost, duplicates, seconds
to recover) with what the tests check. tests/test_faults.py asserts on them; bench/faults.py writes them.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from tests.multinode import REPO, LocalCluster, wait_for

TRAIN_PHOTOS = ["astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
VAL_PHOTOS = ["coffee"]
TRAIN_STEPS, CHECKPOINT_EVERY = 12, 4


def write_photos(photos: dict, names: list[str], folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(photos[name]).save(folder / f"{name}.png")
    return folder


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{log.name} still running after {timeout} s:\n" + log.read_text()[-3000:])


def run_driver(cluster: LocalCluster, args: list[str], log: Path, timeout: float = 900) -> str:
    """`python -m pfsr ARGS` on the head to completion; its output (AssertionError when it fails)."""
    proc = cluster.popen(args, log)
    code = _finish(proc, log, timeout)
    out = log.read_text()
    assert code == 0, f"pfsr {' '.join(args[:1])} exited {code}:\n{out[-4000:]}"
    return out


def _digest_files(folder: Path, pattern: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


# --------------------------------------------------------------------------------------------------------------
# Prep: a node dies while the shards are written.

PREP_ARGS = ["--layout", "folder", "--split", "train", "--patch", "128", "--step", "128", "--min-shards", "12"]


def prep_reference(cluster: LocalCluster, source: Path, out: Path, logs: Path) -> Path:
    run_driver(cluster, ["prep", "--source", str(source), "--out", str(out), *PREP_ARGS], logs / "prep_whole.log")
    return out


def prep_node_death(cluster: LocalCluster, source: Path, reference: Path, out: Path, logs: Path) -> dict:
    """Prep with a worker node SIGKILLed as soon as the write pass starts (its plan is on disk); a failed run is
    started again once. Returns the figures and whether manifest and shards equal the reference byte for byte."""
    args = ["prep", "--source", str(source), "--out", str(out), *PREP_ARGS]
    proc = cluster.popen(args, logs / "prep_killed.log")
    plan = out / "_progress" / "train" / "plan.json"
    wait_for(plan.is_file, 600, "prep's write pass", interval=0.2, alive=lambda: proc.poll() is None)
    records_at_kill = len(list(plan.parent.glob("*.tar.json")))
    victim = sorted(n for n in cluster.procs if n != "head" and cluster.procs[n].poll() is None)[0]
    killed_at = cluster.kill_node(victim)
    code = _finish(proc, logs / "prep_killed.log", 900)
    finished_at = time.monotonic()
    reruns = 0
    if code != 0:
        reruns = 1
        run_driver(cluster, args, logs / "prep_rerun.log")
        finished_at = time.monotonic()
    ref_rows = pq.read_table(reference / "manifest.parquet").to_pylist()
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    keys, ref_keys = Counter(r["key"] for r in rows), {r["key"] for r in ref_rows}
    shards, ref_shards = _digest_files(out, "train-*.tar"), _digest_files(reference, "train-*.tar")
    return {
        "killed_node": victim, "shards_done_at_kill": records_at_kill, "shards": len(ref_shards),
        "first_run_exit_code": code, "reruns": reruns,
        "samples_lost": len(ref_keys - set(keys)), "duplicates": sum(c - 1 for c in keys.values()),
        "manifest_identical": (out / "manifest.parquet").read_bytes() == (reference / "manifest.parquet").read_bytes(),
        "shards_identical": shards == ref_shards,
        "leftovers": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp")
                            or "_progress" in p.parts),
        "seconds_kill_to_done": round(finished_at - killed_at, 1),
    }


# --------------------------------------------------------------------------------------------------------------
# Train: 2 DDP workers on 2 nodes and a spare; the node of one worker dies.

def train_config(root: Path) -> Path:
    """configs/tiny.yaml cut down for 2 shared cores: batch 2 of 32 px crops, a checkpoint every 4 steps."""
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["data"] |= {"batch_size": 2, "crop": 32, "num_workers": 0}
    config["train"] |= {"steps": TRAIN_STEPS, "log_every": 2, "checkpoint_every": CHECKPOINT_EVERY,
                        "keep_checkpoints": 10, "warmup_steps": 2, "torch_threads": 1}
    path = root / "faults_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train_args(config: Path, data: Path, runs: Path, name: str) -> list[str]:
    return ["train", "--config", str(config), "--data", str(data), "--workers", "2", "--storage", str(runs),
            "--name", name]


def _events(run_dir: Path) -> list[dict[str, dict[int, tuple[float, float]]]]:
    """Rank 0's TensorBoard files, one per worker-group start, as tag -> {step: (wall time, value)}, by start."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    starts = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        starts.append({tag: {e.step: (e.wall_time, e.value) for e in acc.Scalars(tag)}
                       for tag in acc.Tags()["scalars"]})
    return sorted(starts, key=lambda s: min(s["run/start_step"]))


def _latest(run_dir: Path) -> dict:
    from pfsr.checkpoint import find_checkpoint, read_checkpoint

    return read_checkpoint(find_checkpoint(str(run_dir), "latest"), kind="training")


def max_abs_difference(a: dict, b: dict) -> float:
    """Largest |a - b| over the model, EMA and optimizer tensors of two training checkpoints."""
    import torch

    def tensors(ckpt: dict):
        yield from ckpt["model"].values()
        yield from ckpt["ema"].values()
        for state in ckpt["optimizer"]["state"].values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))

    return max((x.double() - y.double()).abs().max().item() for x, y in zip(tensors(a), tensors(b)))


def train_reference(cluster: LocalCluster, config: Path, data: Path, runs: Path, logs: Path) -> Path:
    run_driver(cluster, _train_args(config, data, runs, "whole"), logs / "train_whole.log")
    return runs / "whole"


def train_node_death(cluster: LocalCluster, config: Path, data: Path, runs: Path, reference: Path,
                     logs: Path) -> dict:
    """The run `killed`: once Ray has registered its first checkpoint, the node of one training worker is
    SIGKILLed. Returns the figures and the comparison with the uninterrupted run `reference`."""
    from pfsr.checkpoint import read_checkpoint, state_digest
    from pfsr.pipeline.train import RESTORED_DIGEST

    log = logs / "train_killed.log"
    proc = cluster.popen(_train_args(config, data, runs, "killed"), log)
    run_dir = runs / "killed"
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    first = f"checkpoint_{CHECKPOINT_EVERY:06d}"
    wait_for(lambda: snapshot.is_file() and first in snapshot.read_text(), 600, "the first checkpoint",
             alive=lambda: proc.poll() is None, interval=0.2)
    hosts = cluster.processes("RayTrainWorker")
    registered = max(map(int, re.findall(r"checkpoint_(\d{6})", snapshot.read_text())))
    victim = max(hosts)
    killed_wall, killed_at = time.time(), cluster.kill_node(victim)
    code = _finish(proc, log, 900)
    assert code == 0, f"pfsr train exited {code}:\n{log.read_text()[-4000:]}"

    starts = _events(run_dir)
    second = starts[-1]
    restored_from = int(min(second["run/start_step"]))
    trained_before = max(max(s["train/loss_dsm"]) for s in starts[:-1])  # the last step logged before the kill
    resumed_wall = min(t for t, _ in second["train/loss_dsm"].values())
    whole, killed = _latest(reference), _latest(run_dir)
    restored = read_checkpoint(str(run_dir / f"checkpoint_{restored_from:06d}" / "checkpoint.pt"), kind="training")
    sidecars = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/metrics.json")]
    seen = lambda ckpt: sum(p["samples_seen"] for p in ckpt["data_position"]["ranks"])  # noqa: E731
    return {
        "killed_node": victim, "worker_nodes_before": sorted(hosts), "worker_group_starts": len(starts),
        "checkpoint_registered_at_kill": registered, "restored_from_step": restored_from,
        "final_step": killed["step"], "steps_redone_at_least": max(0, trained_before - restored_from),
        "samples_lost": max(0, seen(whole) - seen(killed)), "duplicates": max(0, seen(killed) - seen(whole)),
        "restored_digests_match": all(s["metrics"].get(RESTORED_DIGEST) == state_digest(restored)
                                      for s in sidecars if s["step"] > restored_from),
        "final_state_equal": state_digest(killed) == state_digest(whole),
        "final_max_abs_difference": max_abs_difference(killed, whole),
        "data_position_equal": killed["data_position"] == whole["data_position"],
        "seconds_to_recover": round(resumed_wall - killed_wall, 1),
        "seconds_kill_to_done": round(time.monotonic() - killed_at, 1),
    }


# --------------------------------------------------------------------------------------------------------------
# Evaluate: 2 replicas on 2 nodes; the node of one replica dies.

EVAL_ARGS = ["--sampler", "dpmpp_2m", "--steps", "8", "--replicas", "2"]


def write_eval_images(photo, folder: Path, side: int = 96) -> Path:
    """The photo cut into side x side tiles, one PNG each (the evaluation's HR images)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(photo.shape[0] // side):
        for j in range(photo.shape[1] // side):
            Image.fromarray(photo[i * side:(i + 1) * side, j * side:(j + 1) * side]).save(folder / f"{i}_{j}.png")
    return folder


def evaluate_node_death(cluster: LocalCluster, checkpoint: Path, images: Path, out: Path, logs: Path) -> dict:
    """`pfsr evaluate` of a folder of images with 2 replicas; the node of one is SIGKILLed once both are up.
    Every image must be scored exactly once."""
    log = logs / "evaluate_killed.log"
    proc = cluster.popen(["evaluate", "--checkpoint", str(checkpoint), "--data", str(images), "--out", str(out),
                          *EVAL_ARGS], log)
    hosts = wait_for(lambda: h if len(h := cluster.processes("SRReplica")) >= 2 else None, 600,
                     "2 replicas on 2 nodes", interval=0.2, alive=lambda: proc.poll() is None)
    victim = max(hosts)
    killed_at = cluster.kill_node(victim)
    code = _finish(proc, log, 900)
    assert code == 0, f"pfsr evaluate exited {code}:\n{log.read_text()[-4000:]}"
    expected = {p.stem for p in images.glob("*.png")}
    scored = Counter(pq.read_table(io.BytesIO((out / "per_image.parquet").read_bytes())).column("key").to_pylist())
    report = json.loads((out / "metrics.json").read_text())
    return {
        "killed_node": victim, "replica_nodes_before": sorted(hosts), "images": len(expected),
        "scored": sum(scored.values()), "samples_lost": len(expected - set(scored)),
        "duplicates": sum(c - 1 for c in scored.values()), "unexpected": len(set(scored) - expected),
        "n_images_reported": report["n_images"], "seconds_kill_to_done": round(time.monotonic() - killed_at, 1),
    }
