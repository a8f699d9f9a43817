"""Samples/s the shard loader delivers against the samples/s a configs/tiny.yaml training step consumes.

Shards: the scikit-image photos through `pfsr prep` (--patch 256 --step 128) into a temporary folder. Loader:
pfsr.data.make_train_loader with the tiny config's crop, batch size and shuffle buffer, after its first batches
(worker start-up). Training: pfsr.train.train_step (DSM; LR made on the device) of the tiny model on CPU. The two
are timed apart, each with the machine to itself. Goal: loader >= 5x the training step's consumption.

    python bench/loader.py [--workers 1] [--batches 100] [--steps 5]

Prints one JSON object and writes it to bench/results/loader.json.
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch

from _common import save_photos, run_benchmark, write_result
from pfsr.config import load_config
from pfsr.data import loader_from_config

ROOT = Path(__file__).resolve().parents[1]


def make_shards(folder: Path) -> Path:
    import ray

    from pfsr.pipeline.prep import prep

    src = save_photos(folder)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        prep(str(src), str(folder / "shards"), patch=256, step=128)
    finally:
        ray.shutdown()
    return folder / "shards"


def loader_samples_per_s(shards: Path, config, batches: int, warmup: int = 5) -> float:
    it = iter(loader_from_config(config, str(shards)))
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = sum(b.shape[0] for b in itertools.islice(it, batches))
    return n / (time.perf_counter() - t0)


def train_samples_per_s(config, steps: int) -> float:
    from pfsr.losses import TrainingObjective
    from pfsr.models import build_model
    from pfsr.train import make_state, train_step

    torch.manual_seed(0)
    state = make_state(build_model(config), config)
    objective = TrainingObjective(state.model, config.loss, config.train.stage)
    hr = torch.rand(config.data.batch_size, 3, config.data.crop, config.data.crop)
    gen = torch.Generator().manual_seed(0)
    train_step(objective, hr, state, config, generator=gen)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(objective, hr, state, config, generator=gen)
    return steps * hr.shape[0] / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loader.json")
    args = ap.parse_args(argv)
    config = load_config(ROOT / "configs" / "tiny.yaml")
    if args.workers is not None:
        config.data.num_workers = args.workers
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp))
        n_shards = len(list(shards.glob("train-*.tar")))
        loader_sps = loader_samples_per_s(shards, config, args.batches)
    train_sps = train_samples_per_s(config, args.steps)
    result = {
        "benchmark": "loader",
        "data": f"skimage photos, pfsr prep --patch 256 --step 128: {n_shards} local shards",
        "loader": {"crop": config.data.crop, "batch_size": config.data.batch_size, "num_workers":
                   config.data.num_workers, "shuffle_buffer": config.data.shuffle_buffer,
                   "samples_per_s": round(loader_sps, 1)},
        "train_step": {"config": "configs/tiny.yaml", "stage": config.train.stage, "device": "cpu",
                       "torch_threads": torch.get_num_threads(), "samples_per_s": round(train_sps, 2)},
        "ratio": round(loader_sps / train_sps, 1),
        "goal_ratio": ">= 5",
    }
    return write_result(result, args.out)


if __name__ == "__main__":
    run_benchmark(main)
