"""`pfsr train`: the core training loop (`pfsr.train.train_loop`, unchanged) inside Ray Train.

One TorchTrainer worker per DDP rank (gloo on CPU, nccl on GPU). Each worker streams its own part of the shards
(`pfsr.data`, split by rank), degrades HR crops on its device inside `train_step`, and trains the
`TrainingObjective` wrapped in DistributedDataParallel (one forward holds every loss, so DDP sees one call).

Everything a run keeps lives under storage/name/ (local path or s3://), never on a worker's disk:
    checkpoint_{step:06d}/checkpoint.pt   training checkpoint (model, EMA, optimizer, scheduler, step, config, data
                                          position of every rank); metrics.json beside it (step, metrics)
    tensorboard/                          event files of rank 0, one per worker-group start
    checkpoint_manager_snapshot.json ...  Ray Train's own bookkeeping
Every train.log_every steps ray.train.report gets the train/* metrics (mean over ranks; samples/s summed), every
train.val_every steps rank 0 validates the EMA model (val/psnr_y), and every train.checkpoint_every steps, at
each validation and at the end a checkpoint is reported. CheckpointConfig keeps the best by val/psnr_y beside the
latest (checkpoints without validation rank lowest). After a worker or node dies, FailureConfig restarts the
worker group, which resumes from `ray.train.get_checkpoint()`: its step, optimizer and data position (the steps
after that checkpoint are redone). A run submitted again with --resume and its --name continues the same way.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer
from torch.nn.parallel import DistributedDataParallel

import pfsr

from .. import storage
from ..checkpoint import (BEST_METRIC, CHECKPOINT_FILE, checkpoint_dir_name, find_checkpoint, init_from, load,
                          read_checkpoint, restore_state, save_checkpoint_dir, state_digest, training_checkpoint)
from ..config import Config, ConfigError, config_from_dict, load_config
from ..data import list_shards, load_val_images, loader_from_config
from ..degradation import degrade, to_uint8
from ..errors import InputError
from ..inference import super_resolve_tiled
from ..losses import TrainingObjective
from ..metrics import psnr
from ..models.sr import PFSRModel, build_model
from ..train import TrainState, format_metrics, make_state, train_loop

TENSORBOARD_DIR = "tensorboard"
SCORE = "checkpoint/score"
UNVALIDATED_SCORE = -1e9
RESTORED_DIGEST = "run/restored_digest"  # state_digest of the state a restarted worker group restored


def log(message: str) -> None:
    print(f"train: {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Worker side: one process per DDP rank.

@torch.no_grad()
def validate(model: PFSRModel, hr_images: list[np.ndarray], config: Config, device: torch.device) -> float:
    """Mean PSNR on Y (BasicSR: `scale` border pixels cropped) of the model's SR of the bicubic LR (quantized to
    8 bits, as LR files are) of each HR image [H x W x 3] uint8, center-cropped to data.val_max_size, with the
    config's val sampler."""
    s, tc, limit = config.model.scale, config.train, config.data.val_max_size
    model.eval()
    values = []
    for i, img in enumerate(hr_images):
        h, w = img.shape[:2]
        ch, cw = (min(h, limit), min(w, limit)) if limit else (h, w)
        ch, cw = ch // s * s, cw // s * s  # and mod-crop, as BasicSR
        top, left = (h - ch) // 2, (w - cw) // 2
        img = img[top:top + ch, left:left + cw].copy()
        hr = torch.from_numpy(img).permute(2, 0, 1)[None].to(device).float() / 255
        lr = to_uint8(degrade(hr, s)).float() / 255
        sr, _ = super_resolve_tiled(model, lr, method=tc.val_sampler, steps=tc.val_steps, seed=i)
        values.append(psnr(to_uint8(sr[0]).permute(1, 2, 0).cpu(), img, crop_border=s, test_y_channel=True))
    return float(np.mean(values))


def _reduce_metrics(metrics: dict[str, float], world_size: int, device: torch.device) -> dict[str, float]:
    """Mean of every metric over the ranks, except samples/s, which is summed (the global throughput)."""
    if world_size == 1:
        return dict(metrics)
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)  # nccl: on the GPU
    dist.all_reduce(values)
    return {k: v / (1 if k == "train/samples_per_s" else world_size) for k, v in zip(keys, values.tolist())}


def _all_positions(position: dict, world_size: int) -> list[dict]:
    if world_size == 1:
        return [position]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, position)
    return out


def _restore(ckpt: dict, config: Config, device: torch.device) -> TrainState:
    state, _ = restore_state(ckpt, config)
    state.model.to(device)
    state.ema.to(device)
    # Loading the optimizer state again after the move puts its moments on the parameters' device.
    state.optimizer.load_state_dict(state.optimizer.state_dict())
    return state


def _upload_tensorboard(local_dir: str, filesystem: pafs.FileSystem, run_path: str) -> None:
    dest = f"{run_path}/{TENSORBOARD_DIR}"
    filesystem.create_dir(dest, recursive=True)  # a local destination is not created by copy_files
    pafs.copy_files(local_dir, dest, destination_filesystem=filesystem)


def train_worker(cfg: dict) -> None:
    """train_loop_per_worker: restore or build the state, then the core loop with reports and checkpoints."""
    from torch.utils.tensorboard import SummaryWriter

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config = config_from_dict(cfg["config"])
    tc = config.train
    # A thread count that does not depend on where the worker lands: float sums (and so the trained weights) do.
    torch.set_num_threads(tc.torch_threads or max(1, int(cfg["cpus_per_worker"])))
    device = ray.train.torch.get_device()

    restored, restored_digest = ray.train.get_checkpoint(), None  # set after a failure and on --resume
    if restored is not None or cfg["resume_from"]:
        if restored is not None:
            with restored.as_directory() as folder:
                state = _restore(load(Path(folder) / CHECKPOINT_FILE, kind="training"), config, device)
        else:
            state = _restore(read_checkpoint(cfg["resume_from"], kind="training"), config, device)
        # Reported with every later checkpoint: a test compares it with the digest of the checkpoint restored.
        restored_digest = state_digest(training_checkpoint(state, config))
    else:
        torch.manual_seed(tc.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        state = make_state(build_model(config), config)
        if cfg["init"]:
            missing = init_from(state, read_checkpoint(cfg["init"]))
            if rank == 0:
                log(f"initialized from {cfg['init']} ({len(missing)} parameters not in it start fresh)")
        state.model.to(device)
        state.ema.to(device)
    start_step = state.step

    positions = state.data_position.get("ranks") or [None]
    loader = loader_from_config(config, cfg["data"], rank=rank, world_size=world,
                                position=positions[min(rank, len(positions) - 1)])
    objective_core = TrainingObjective(state.model, config.loss, tc.stage).to(device)
    objective: torch.nn.Module = objective_core
    if world > 1:
        objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)

    val_images = load_val_images(cfg["val_data"], limit=config.data.val_images) if cfg["val_data"] and rank == 0 \
        else []
    writer = SummaryWriter(tempfile.mkdtemp(prefix="pfsr-tb-")) if rank == 0 else None
    if rank == 0:
        position = loader.position()
        log(f"{'resumed at' if start_step else 'starting at'} step {start_step}/{tc.steps} on {world} worker(s), "
            f"{device}, data epoch {position['epoch']} after {position['samples_seen']} samples of rank 0")
        log(f"{tc.stage} stage; image-quality loss: {objective_core.describe_quality()}")
        writer.add_scalar("run/start_step", start_step, start_step)
        writer.add_scalar("data/samples_seen", position["samples_seen"], start_step)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        metrics = _reduce_metrics(metrics, world, device)
        position = loader.position()
        metrics |= {"run/start_step": start_step, "data/epoch": position["epoch"],
                    "data/samples_seen": position["samples_seen"]}
        validated = bool(cfg["val_data"]) and (step % tc.val_every == 0 or step == tc.steps)
        if validated and rank == 0:
            metrics[BEST_METRIC] = validate(state.ema, val_images, config, device)
            state.best_val = max(state.best_val or -math.inf, metrics[BEST_METRIC])
        if rank == 0:
            log(format_metrics(step, tc.steps, metrics))
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
            writer.flush()
        if not (validated or step % tc.checkpoint_every == 0 or step == tc.steps):
            ray.train.report(metrics)
            return
        state.data_position = {"ranks": _all_positions(position, world)}
        name = checkpoint_dir_name(step)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        # The score CheckpointConfig ranks by: val/psnr_y, or below any PSNR for a checkpoint without validation
        # (finite: Ray's run snapshot stores NaN as null and then fails to restore the run).
        metrics[SCORE] = metrics.get(BEST_METRIC, UNVALIDATED_SCORE)
        if restored_digest:
            metrics[RESTORED_DIGEST] = restored_digest
        _upload_tensorboard(writer.log_dir, cfg["filesystem"], cfg["run_path"])
        with tempfile.TemporaryDirectory(prefix="pfsr-ckpt-") as folder:
            save_checkpoint_dir(folder, training_checkpoint(state, config, metrics))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=name)

    if state.step < tc.steps:
        train_loop(state, config, loader, objective=objective, device=device, on_log=on_log,
                   noise_seed=(tc.seed, rank))
    if writer is not None:
        writer.close()
        _upload_tensorboard(writer.log_dir, cfg["filesystem"], cfg["run_path"])
        shutil.rmtree(writer.log_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Driver side.

def _check_schedule(config: Config) -> None:
    tc = config.train
    for key in ("checkpoint_every", "val_every"):
        value = getattr(tc, key)
        if value < 1 or value % tc.log_every:
            raise ConfigError(f"train.{key}: must be a positive multiple of train.log_every ({tc.log_every}), "
                              f"got {value}")


def _init_ray(address: Optional[str]) -> None:
    if ray.is_initialized():
        return
    try:
        # Ship the package to every worker: a cluster started elsewhere need not have pfsr installed, and one
        # that has it runs the code of this checkout.
        ray.init(address=address, runtime_env={"py_modules": [str(Path(pfsr.__file__).parent)]})
    except ValueError as e:
        if "Failed to merge" not in str(e):
            raise
        ray.init(address=address)  # the submitted job's runtime env already ships py_modules


def _absolute(uri: Optional[str]) -> Optional[str]:
    """Local paths made absolute: the workers' working directory is not the driver's."""
    return uri if not uri or storage.is_s3(uri) else storage.resolve(uri)[1]


def _has_checkpoints(run_uri: str) -> bool:
    try:
        find_checkpoint(run_uri, "latest")
    except InputError:
        return False
    return True


def train(config: Config | str | Path, *, data: Optional[str] = None, val_data: Optional[str] = None,
          workers: int = 1, gpu: bool = False, steps: Optional[int] = None, storage_uri: str = "runs",
          name: Optional[str] = None, resume: bool = False, init: Optional[str] = None,
          cpus_per_worker: float = 1, ray_address: Optional[str] = None) -> "ray.train.Result":
    """Train with Ray Train; returns the Result (its `path` is the run directory storage_uri/name).

    `config` a Config or a YAML path; `data`/`val_data` override data.train/data.val; `steps` train.steps.
    `resume` continues the run `name` from its latest checkpoint; `init` starts from the best checkpoint of a
    previous stage's run (or a given checkpoint). data.batch_size is per worker.
    """
    default_name = f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}" if not isinstance(config, Config) \
        else f"{config.train.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    if steps is not None and steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    if not isinstance(config, Config):
        config = load_config(config, {"train.steps": steps} if steps is not None else None)
    elif steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps)).validate()
    _check_schedule(config)
    tc = config.train
    data, val_data = _absolute(data or config.data.train), _absolute(val_data or config.data.val)
    if not data:
        raise InputError("no training shards: pass --data or set data.train in the config")
    if not list_shards(data, "train"):
        raise InputError(f"{data}: no train-NNNNNN.tar shards (make them with `pfsr prep --split train`)")
    if val_data and not storage.exists(val_data):
        raise InputError(f"validation data {val_data} does not exist")
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if resume and not name:
        raise InputError("--resume needs the --name of the run to continue")
    name = name or default_name
    filesystem, storage_path = storage.resolve(storage_uri)
    run_uri = storage.join(storage_uri if storage.is_s3(storage_uri) else storage_path, name)
    storage.exists(run_uri)  # an unreachable S3 endpoint fails here, named, not inside Ray Train
    resume_from = None
    if resume:
        if not _has_checkpoints(run_uri):
            raise InputError(f"--resume: run {run_uri} has no checkpoint to continue from")
        resume_from = find_checkpoint(run_uri, "latest")
    elif _has_checkpoints(run_uri):
        raise InputError(f"run {run_uri} exists already: pass --resume to continue it, or another --name")
    init_uri = None
    if init:
        init_uri = find_checkpoint(_absolute(init), "best")
        read_checkpoint(init_uri)  # refuse a wrong file here, not in every worker

    _init_ray(ray_address)
    resources = {"CPU": cpus_per_worker} | ({"GPU": 1} if gpu else {})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.to_dict(), "data": data, "val_data": val_data, "init": init_uri,
                           "resume_from": resume_from, "filesystem": filesystem, "cpus_per_worker": cpus_per_worker,
                           "run_path": f"{storage_path}/{name}"},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            # Explicit filesystem: a bare S3FileSystem rebuilt from the path would lose AWS_ENDPOINT_URL.
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=tc.keep_checkpoints,
                checkpoint_score_attribute=SCORE if val_data else None, checkpoint_score_order="max"),
        ),
    )
    log(f"run {run_uri}: stage {tc.stage}, {tc.steps} steps, {workers} {'GPU' if gpu else 'CPU'} worker(s) x "
        f"batch {config.data.batch_size}" + (f", resuming {resume_from}" if resume_from else "")
        + (f", init from {init_uri}" if init_uri else ""))
    result = trainer.fit()
    best = find_checkpoint(run_uri, "best")
    log(f"done: {run_uri} (latest {find_checkpoint(run_uri, 'latest')}, best {best})")
    return result


def run_cli(args: argparse.Namespace) -> int:
    try:
        train(args.config, data=args.data, val_data=args.val_data, workers=args.workers, gpu=args.gpu,
              steps=args.steps, storage_uri=args.storage, name=args.name, resume=args.resume, init=args.init,
              cpus_per_worker=args.cpus_per_worker, ray_address=args.ray_address)
    except ray.train.TrainingFailedError as e:
        print(f"pfsr train: training failed: {e}", file=sys.stderr)
        return 1
    return 0
