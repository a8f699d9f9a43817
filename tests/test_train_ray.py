"""The Ray Train job (issue 5) on real parts: the shared local Ray cluster, a real S3 endpoint (moto server), shards
of scikit-image's photos made by `pfsr prep`, a real SIGKILL of a training worker, and `ray job submit` to a
`ray start --head` of the test's own.

Kept small for 2 shared cores: configs/tiny.yaml with batch 4 (per worker) of 64 px crops for 20-30 steps.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest
import torch
from PIL import Image

from pfsr import storage
from pfsr.checkpoint import find_checkpoint, read_checkpoint, state_digest
from pfsr.cli import main
from pfsr.config import load_config
from pfsr.pipeline.train import RESTORED_DIGEST
from tests.multinode import cmdline, descendants, parents

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BUCKET = "pfsr-train-ray"
SPLITS = {"train": ["astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"],
          "val": ["coffee"]}


def tiny(**train) -> object:
    overrides = {"data.batch_size": 4, "data.crop": 64, "data.val_images": 1, "train.log_every": 5,
                 "train.val_steps": 4} | {f"train.{k}": v for k, v in train.items()}
    return load_config(REPO / "configs" / "tiny.yaml", overrides)


@pytest.fixture(scope="module")
def shards(ray_cluster, s3_endpoint, photos, tmp_path_factory) -> dict[str, str]:
    """s3:// URIs of the train shards (128 px sub-images, 4 shards) and val shards, from disjoint photos."""
    from pfsr.pipeline.prep import prep

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    root = tmp_path_factory.mktemp("photos")
    uris = {}
    for split, names in SPLITS.items():
        (root / split).mkdir()
        for name in names:
            Image.fromarray(photos[name]).save(root / split / f"{name}.png")
        uris[split] = f"s3://{BUCKET}/shards/{split}"
        prep(str(root / split), uris[split], split=split, patch=128 if split == "train" else 96,
             step=128 if split == "train" else 96, min_shards=4 if split == "train" else 1)
    return uris


def _download(prefix: str, dest: Path) -> Path:
    for entry in storage.list_files(prefix):
        path = dest / entry.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.read_bytes(storage.join(prefix, entry.path)))
    return dest


def _event_files(run_uri: str, dest: Path) -> list[dict[str, dict[int, float]]]:
    """The run's TensorBoard event files (one per worker-group start), each as tag -> {step: value}, in the
    order of their start step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = []
    for path in sorted(_download(storage.join(run_uri, "tensorboard"), dest).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        files.append({tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]})
    return sorted(files, key=lambda f: min(f["run/start_step"]))


def _sidecars(run_uri: str) -> list[dict]:
    """metrics.json of every checkpoint folder of the run."""
    return [json.loads(storage.read_bytes(storage.join(run_uri, e.path))) for e in storage.list_files(run_uri)
            if e.path.startswith("checkpoint_") and e.path.endswith("/metrics.json")]


@pytest.fixture(scope="module")
def trained_run(shards) -> str:
    """A 2-worker CPU run of configs/tiny.yaml, 30 steps, run directory on S3."""
    from pfsr.pipeline.train import train

    train(tiny(steps=30, checkpoint_every=10, val_every=30), data=shards["train"], val_data=shards["val"],
          workers=2, storage_uri=f"s3://{BUCKET}/runs", name="tiny-2w")
    return f"s3://{BUCKET}/runs/tiny-2w"


def test_two_workers_on_s3_reach_steps_and_loss_falls(trained_run, tmp_path):
    (events,) = _event_files(trained_run, tmp_path)  # one worker-group start: no failure
    loss = events["train/loss_dsm"]
    assert sorted(loss) == [5, 10, 15, 20, 25, 30]
    start, end = (loss[5] + loss[10]) / 2, (loss[25] + loss[30]) / 2
    assert end < start, loss
    assert events["train/samples_per_s"][30] > 0

    latest = read_checkpoint(find_checkpoint(trained_run, "latest"), kind="training")
    assert latest["step"] == 30
    ranks = latest["data_position"]["ranks"]
    assert [p["rank"] for p in ranks] == [0, 1] and all(p["samples_seen"] == 30 * 4 for p in ranks)
    steps = sorted(s["step"] for s in _sidecars(trained_run))
    assert steps == [10, 20, 30]
    psnr = latest["metrics"]["val/psnr_y"]
    assert math.isfinite(psnr) and 10 < psnr < 60
    assert find_checkpoint(trained_run, "best") == find_checkpoint(trained_run, "latest")  # the one validated

    out = tmp_path / "model.pt"
    assert main(["export", "--run", trained_run, "--out", str(out)]) == 0
    served = torch.load(out, weights_only=True)
    assert served["kind"] == "serving" and served["step"] == 30
    assert all(torch.equal(served["model"][k], latest["ema"][k]) for k in latest["ema"])


def test_resume_continues_the_named_run(trained_run, shards):
    from pfsr.errors import InputError
    from pfsr.pipeline.train import train

    config = tiny(steps=35, checkpoint_every=10, val_every=30)
    with pytest.raises(InputError, match="exists already: pass --resume"):
        train(config, data=shards["train"], storage_uri=f"s3://{BUCKET}/runs", name="tiny-2w")
    with pytest.raises(InputError, match="no checkpoint to continue from"):
        train(config, data=shards["train"], storage_uri=f"s3://{BUCKET}/runs", name="nothing-here", resume=True)
    train(config, data=shards["train"], val_data=shards["val"], workers=2, storage_uri=f"s3://{BUCKET}/runs",
          name="tiny-2w", resume=True)
    latest = read_checkpoint(find_checkpoint(trained_run, "latest"), kind="training")
    assert latest["step"] == 35 and latest["metrics"]["run/start_step"] == 30
    assert all(p["samples_seen"] == 35 * 4 for p in latest["data_position"]["ranks"])


def _wait_for(predicate, timeout: float, what: str, alive: threading.Thread | None = None,
              interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or (alive is not None and not alive.is_alive()):
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)


def test_killed_worker_resumes_from_last_checkpoint(shards, tmp_path):
    from pfsr.pipeline.train import train

    run_uri = f"s3://{BUCKET}/runs/tiny-kill"
    outcome: dict = {}

    def fit():
        try:
            train(tiny(steps=20, checkpoint_every=5, keep_checkpoints=10), data=shards["train"], workers=2,
                  storage_uri=f"s3://{BUCKET}/runs", name="tiny-kill")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=fit)
    thread.start()
    snapshot = storage.join(run_uri, "checkpoint_manager_snapshot.json")
    # Ray has registered the first checkpoint once its snapshot names it: only then is it the one to restore.
    _wait_for(lambda: storage.is_file(snapshot) and b"checkpoint_000005" in storage.read_bytes(snapshot), 300,
              "the first checkpoint", alive=thread)
    named = {p for p in descendants(os.getpid()) if "RayTrainWorker" in cmdline(p)}
    parent_of = parents()
    workers = [p for p in named if parent_of.get(p) not in named]  # not their DataLoader processes (forks)
    assert len(workers) == 2, workers
    restored_from = max(map(int, re.findall(rb"checkpoint_(\d{6})", storage.read_bytes(snapshot))))
    os.kill(max(workers), signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive() and "error" not in outcome, outcome

    sidecars = sorted(_sidecars(run_uri), key=lambda s: s["saved_at"])
    steps = [s["step"] for s in sidecars]
    assert steps == sorted(set(steps)) and steps[-1] == 20, steps  # only increasing, finished at the target
    for side in sidecars:  # checkpoints after the kill come from the worker group restored at that checkpoint
        assert side["metrics"]["run/start_step"] == (0 if side["step"] <= restored_from else restored_from)

    # The restarted workers restored the checkpoint bit for bit: model, EMA and optimizer (their digest, reported
    # with every later checkpoint, equals the saved checkpoint's).
    restored = read_checkpoint(storage.join(run_uri, f"checkpoint_{restored_from:06d}", "checkpoint.pt"),
                               kind="training")
    digests = [side["metrics"].get(RESTORED_DIGEST) for side in sidecars]
    assert digests == [None if side["step"] <= restored_from else state_digest(restored) for side in sidecars]

    first, second = _event_files(run_uri, tmp_path)  # a second worker-group start: the restore
    assert min(second["run/start_step"]) == restored_from
    position = restored["data_position"]["ranks"][0]
    seen = second["data/samples_seen"]
    assert seen[restored_from] == position["samples_seen"] == restored_from * 4  # data position restored
    # Every step after the checkpoint was trained again, once: the log continues from there to the end.
    assert sorted(second["train/loss_dsm"]) == list(range(restored_from + 5, 21, 5))
    assert all(seen[s] == s * 4 for s in second["train/loss_dsm"])
    assert min(first["run/start_step"]) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(s3_endpoint, tmp_path_factory):
    """`ray start --head --block` of this test: own ports, own temp dir, own auth token; AWS_* for its workers.
    Yields (dashboard address, environment for the `ray` CLI); SIGTERM stops what it started."""
    temp_dir = f"/tmp/pfsr-head-{secrets.token_hex(4)}"  # short: Ray's socket paths live below it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # nothing to drain once the job is done
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    dashboard = _free_port()
    log = open(tmp_path_factory.mktemp("head") / "ray.log", "w")
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", temp_dir,
         "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port())],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for(lambda: head.poll() is None and subprocess.run(
            ["ray", "job", "list", "--address", address], env=env, capture_output=True).returncode == 0
            or head.poll() is not None, 120, "the Ray head", interval=2)
        assert head.poll() is None, Path(log.name).read_text()[-3000:]
        yield address, env
    finally:
        started = descendants(head.pid)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        for pid in descendants(head.pid) + started:  # anything of ours still running after the head stopped
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_to_local_head(ray_head, shards, trained_run):
    """jobs/train.py submitted with --working-dir . : the next stage, initialized from the S3 run above."""
    address, env = ray_head
    job_id = f"pfsr-train-{secrets.token_hex(3)}"
    submit = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", str(REPO),
         "--no-wait", "--", "python", "jobs/train.py", "--config", "configs/tiny.yaml", "--data", shards["train"],
         "--workers", "1", "--steps", "2", "--storage", f"s3://{BUCKET}/jobruns", "--name", "from-job",
         "--init", trained_run],
        env=env, capture_output=True, text=True, cwd=REPO)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    def status() -> str:  # the client reads the head's auth token from env
        code = "import sys; from ray.job_submission import JobSubmissionClient as C; " \
               "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)"
        return subprocess.run([sys.executable, "-c", code, address, job_id], env=env, capture_output=True,
                              text=True).stdout.strip()

    _wait_for(lambda: status() in ("SUCCEEDED", "FAILED", "STOPPED"), 400, "the job", interval=3)
    logs = subprocess.run(["ray", "job", "logs", job_id, "--address", address], env=env, capture_output=True,
                          text=True).stdout
    assert status() == "SUCCEEDED", logs[-4000:]
    assert "init from" in logs
    run_uri = f"s3://{BUCKET}/jobruns/from-job"
    assert read_checkpoint(find_checkpoint(run_uri, "latest"), kind="training")["step"] == 2
    assert storage.list_files(storage.join(run_uri, "tensorboard"))


def test_inversion_stage_trains_the_inverter_of_a_trained_run(trained_run, shards, photos, tmp_path):
    """Seed 001's stage through `pfsr train` (Ray Train, S3 storage, --init, export): the frozen PF-SR weights stay
    the init's, the noise predictor moves from its zero start, and the export serves `--sampler invsr`."""
    config = tmp_path / "inversion.yaml"
    config.write_text(f"base: {REPO / 'configs' / 'tiny_inversion.yaml'}\ndata:\n  batch_size: 4\n  val_images: 1\n"
                      "train:\n  steps: 10\n  log_every: 5\n  checkpoint_every: 5\n  val_every: 10\n")
    init = read_checkpoint(find_checkpoint(trained_run, "best"), kind="training")
    assert main(["train", "--config", str(config), "--data", shards["train"], "--val-data", shards["val"],
                 "--storage", f"s3://{BUCKET}/runs", "--name", "tiny-inversion", "--init", trained_run]) == 0
    run = f"s3://{BUCKET}/runs/tiny-inversion"
    latest = read_checkpoint(find_checkpoint(run, "latest"), kind="training")
    assert latest["step"] == 10 and latest["config"]["train"]["stage"] == "inversion"
    assert math.isfinite(latest["metrics"]["train/loss_l2"]) and math.isfinite(latest["metrics"]["val/psnr_y"])
    frozen = [k for k in latest["model"] if not k.startswith("inverter.")]
    assert frozen and all(torch.equal(latest["model"][k], init["ema"][k]) for k in frozen)
    assert latest["model"]["inverter.conv_out.2.weight"].abs().max() > 0  # zero at the start

    out, png, sr = tmp_path / "inversion.pt", tmp_path / "lr.png", tmp_path / "sr.png"
    assert main(["export", "--run", run, "--out", str(out)]) == 0
    Image.fromarray(photos["coffee"][100:124, 100:132]).save(png)
    assert main(["upscale", str(png), str(sr), "--checkpoint", str(out), "--sampler", "invsr", "--steps", "2"]) == 0
    assert Image.open(sr).size == (128, 96)
