"""Node-loss scenarios on a LocalCluster (tests/multinode.py): each runs the product's CLI as a driver on the head,
kills a worker node at a defined point, and returns its figures (steps redone, samples lost, duplicates, seconds
to recover) with what the tests check. tests/test_faults.py asserts on them; bench/faults.py writes them.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from tests.multinode import REPO, LocalCluster, free_port, wait_for

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
    trained_before = max((max(s["train/loss_dsm"]) for s in starts[:-1]), default=restored_from)  # before the kill
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
    """`pfsr evaluate` of a folder of images with 2 replicas; the node of one is SIGKILLed once both are up and a
    new node is started. Every image must be scored exactly once."""
    log = logs / "evaluate_killed.log"
    proc = cluster.popen(["evaluate", "--checkpoint", str(checkpoint), "--data", str(images), "--out", str(out),
                          *EVAL_ARGS], log)
    hosts = wait_for(lambda: h if len(h := cluster.processes("SRReplica")) >= 2 else None, 600,
                     "2 replicas on 2 nodes", interval=0.2, alive=lambda: proc.poll() is None)
    victim = max(hosts)
    killed_at = cluster.kill_node(victim)
    # A replacement node, as a cloud's autoscaler starts one: with no CPU to spare, Ray Data cannot re-run the
    # read that made a block lost with the node while the surviving replica waits for it (the job stalls).
    replacement = threading.Thread(target=cluster.add_node)
    replacement.start()
    code = _finish(proc, log, 900)
    replacement.join()
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


# --------------------------------------------------------------------------------------------------------------
# S3: every request of the cluster and its drivers passes the fault proxy (tests/s3_faults.py).

def s3_faults(cluster: LocalCluster, schedule, bucket: str, source: Path, reference: Path, config: Path,
              images: Path, logs: Path) -> dict:
    """prep to S3, train with its run directory on S3 (then --resume to more steps), export and evaluate from and
    to S3, while `schedule` injects faults; returns what came out, compared with the fault-free `reference`
    shards and with the objects in the bucket (read past the proxy)."""
    import boto3
    import torch

    from pfsr import storage
    from pfsr.checkpoint import find_checkpoint, read_checkpoint

    s3 = f"s3://{bucket}"
    schedule.enabled = True
    t0 = time.monotonic()
    try:
        run_driver(cluster, ["prep", "--source", str(source), "--out", f"{s3}/shards", *PREP_ARGS], logs / "s3_prep.log")
        train = ["train", "--config", str(config), "--data", f"{s3}/shards", "--workers", "1", "--storage",
                 f"{s3}/runs", "--name", "s3"]
        run_driver(cluster, [*train, "--steps", str(CHECKPOINT_EVERY)], logs / "s3_train.log")
        run_driver(cluster, [*train, "--steps", str(2 * CHECKPOINT_EVERY), "--resume"], logs / "s3_resume.log")
        run_driver(cluster, ["export", "--run", f"{s3}/runs/s3", "--out", f"{s3}/model.pt", "--which", "latest"],
                   logs / "s3_export.log")
        run_driver(cluster, ["evaluate", "--checkpoint", f"{s3}/model.pt", "--data", str(images), "--out",
                             f"{s3}/eval", *EVAL_ARGS], logs / "s3_evaluate.log")
    finally:
        schedule.enabled = False
    seconds = time.monotonic() - t0
    shards = {e.path: hashlib.sha256(storage.read_bytes(storage.join(f"{s3}/shards", e.path))).hexdigest()
              for e in storage.list_files(f"{s3}/shards") if e.path.endswith(".tar")}
    manifest = pq.read_table(io.BytesIO(storage.read_bytes(f"{s3}/shards/manifest.parquet"))).to_pylist()
    ref_manifest = pq.read_table(reference / "manifest.parquet").to_pylist()
    latest = read_checkpoint(find_checkpoint(f"{s3}/runs/s3", "latest"), kind="training")
    served = torch.load(io.BytesIO(storage.read_bytes(f"{s3}/model.pt")), weights_only=True)
    scored = Counter(pq.read_table(io.BytesIO(storage.read_bytes(f"{s3}/eval/per_image.parquet")))
                     .column("key").to_pylist())
    client = boto3.client("s3")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {
        "faults_injected": dict(schedule.injected), "seconds": round(seconds, 1),
        "shards_identical": shards == _digest_files(reference, "train-*.tar"),
        "manifest_rows_equal": manifest == ref_manifest,
        "final_step": latest["step"], "resumed_from": latest["metrics"].get("run/start_step"),
        "export_equals_ema": served["step"] == latest["step"] and all(
            torch.equal(served["model"][k], latest["ema"][k]) for k in latest["ema"]),
        "images": len(list(images.glob("*.png"))), "scored": sum(scored.values()), "duplicates":
        sum(c - 1 for c in scored.values()),
        "half_written": [k for k in keys if k.endswith(".tmp") or "/_progress/" in k]
        + [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])],
    }


# --------------------------------------------------------------------------------------------------------------
# Serve: 2 replicas on 2 nodes under twice their capacity; the node of one replica dies halfway.

SERVE_PARAMS = "/upscale?sampler=dpmpp_2m&steps=2"


def _post(port: int, body: bytes, timeout: float = 120) -> dict:
    """One POST /upscale: {'start', 'end', 'status' (None: no HTTP answer), 'reset', 'retry_after', 'json'}."""
    import http.client

    start = time.monotonic()
    out = {"start": start, "status": None, "reset": False, "retry_after": None, "json": False}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", SERVE_PARAMS, body=body, headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        data = resp.read()
        out |= {"status": resp.status, "retry_after": resp.getheader("Retry-After")}
        if resp.status != 200:
            try:
                out["json"] = isinstance(json.loads(data).get("error"), str)
            except (ValueError, AttributeError):
                pass
    except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
        out["reset"] = True
    except OSError as e:  # refused, timed out: neither an answer nor a reset
        out["error"] = type(e).__name__
    finally:
        conn.close()
    out["end"] = time.monotonic()
    return out


def _closed_loop(port: int, body: bytes, clients: int, seconds: float) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    stop = time.monotonic() + seconds

    def client(_):
        done = []
        while time.monotonic() < stop:
            done.append(_post(port, body))
        return done

    with ThreadPoolExecutor(clients) as pool:
        return [r for rs in pool.map(client, range(clients)) for r in rs]


def serve_node_death(cluster: LocalCluster, checkpoint: Path, root: Path, logs: Path, load_s: float = 20,
                     capacity_s: float = 10) -> dict:
    """`pfsr serve` with 2 replicas (1 CPU each, so on 2 nodes). Capacity: what 4 closed-loop clients get for
    `capacity_s`; then requests arrive at twice that rate for `load_s` (open loop), and the node of one replica is
    SIGKILLed halfway. Connection resets (a request held by the killed node's own proxy: on one machine the
    nodes' proxies share the port) are counted apart from HTTP answers."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image

    port = free_port()
    config = root / "serve2.yaml"
    config.write_text(yaml.safe_dump({"serve": {"min_replicas": 2, "max_replicas": 2, "max_batch_size": 4}}))
    log = logs / "serve.log"
    proc = cluster.popen(["serve", "--checkpoint", str(checkpoint), "--config", str(config), "--port", str(port)],
                         log)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    body = buf.getvalue()
    try:
        wait_for(lambda: len(cluster.processes("ServeReplica")) == 2 and _post(port, body)["status"] == 200, 600,
                 "2 serve replicas answering", interval=1, alive=lambda: proc.poll() is None)
        hosts = cluster.processes("ServeReplica")
        warm = _closed_loop(port, body, 4, capacity_s)
        ok = [r for r in warm if r["status"] == 200]
        capacity = len(ok) / capacity_s
        rate = 2 * capacity
        n = max(1, int(rate * load_s))
        t0 = time.monotonic()
        victim = max(hosts)
        replicas_back: list[float] = []

        def watch(killed_at: float) -> None:
            while time.monotonic() < killed_at + 300:
                if len(cluster.processes("ServeReplica")) == 2:
                    replicas_back.append(time.monotonic())
                    return
                time.sleep(0.5)

        def scheduled(i: int) -> dict:
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            return _post(port, body)

        with ThreadPoolExecutor(min(64, n)) as pool:
            futures = [pool.submit(scheduled, i) for i in range(n)]
            time.sleep(max(0.0, t0 + load_s / 2 - time.monotonic()))
            killed_at = cluster.kill_node(victim)
            watcher = threading.Thread(target=watch, args=(killed_at,))
            watcher.start()
            results = [f.result() for f in futures]
        watcher.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    answered = [r for r in results if r["status"] is not None]
    latencies = sorted(r["end"] - r["start"] for r in answered if r["status"] == 200)
    after = [r for r in answered if r["status"] == 200 and r["start"] >= killed_at]
    pct = lambda q: round(float(np.percentile(latencies, q)), 3) if latencies else None  # noqa: E731
    return {
        "replica_nodes_before": sorted(hosts), "killed_node": victim, "capacity_rps": round(capacity, 3),
        "load_rps": round(rate, 3), "requests": len(results),
        "requests_by_status": dict(Counter(str(r["status"]) for r in answered)),
        "connection_resets": sum(r["reset"] for r in results),
        "other_errors": dict(Counter(r["error"] for r in results if "error" in r)),
        "non_200_without_json": sum(1 for r in answered if r["status"] != 200 and not r["json"]),
        "503_without_retry_after": sum(1 for r in answered if r["status"] == 503 and not r["retry_after"]),
        "latency_p50_s": pct(50), "latency_p99_s": pct(99),
        "seconds_to_first_200_after_kill": round(min(r["end"] for r in after) - killed_at, 1) if after else None,
        "seconds_to_2_replicas_again": round(replicas_back[0] - killed_at, 1) if replicas_back else None,
    }
