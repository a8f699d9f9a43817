"""Training determinism across a checkpoint (issue 16): the core loop resumed from a saved training checkpoint
ends bit-identical to an uninterrupted run; state_digest tells the two apart when a single bit differs."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from pfsr.checkpoint import load, restore_state, save, state_digest, training_checkpoint
from pfsr.config import load_config
from pfsr.models.sr import build_model
from pfsr.train import make_state, step_seed, train_loop

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config():
    return load_config(REPO / "configs" / "tiny.yaml",
                       {"data.batch_size": 2, "data.crop": 32, "train.steps": 6, "train.warmup_steps": 2,
                        "loss.quality_weight": 0.0, "model.unet_dropout": 0.1})


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(7)
    return [torch.from_numpy(rng.random((2, 3, 32, 32), dtype=np.float32)) for _ in range(6)]


def _fresh(config):
    torch.manual_seed(0)
    return make_state(build_model(config), config)


def _round_trip(state, config):
    buf = io.BytesIO()
    save(training_checkpoint(state, config), buf)
    return load(buf.getvalue(), kind="training")


def test_resumed_run_equals_uninterrupted_run(config, batches):
    torch.set_num_threads(1)
    whole = train_loop(_fresh(config), config, batches, noise_seed=(0, 1))

    first = train_loop(_fresh(config), config, batches[:3], until_step=3, noise_seed=(0, 1))
    saved = _round_trip(first, config)
    resumed, _ = restore_state(saved, config)
    assert state_digest(training_checkpoint(resumed, config)) == state_digest(saved)
    torch.manual_seed(12345)  # another process, another RNG state: the steps' noise must not depend on it
    resumed = train_loop(resumed, config, batches[3:], noise_seed=(0, 1))

    assert resumed.step == whole.step == 6
    assert state_digest(training_checkpoint(resumed, config)) == state_digest(training_checkpoint(whole, config))
    for a, b in zip(resumed.ema.parameters(), whole.ema.parameters()):
        assert torch.equal(a, b)

    # Another rank draws other noise, so it ends elsewhere (the digest sees it).
    other = train_loop(_fresh(config), config, batches, noise_seed=(0, 0))
    assert state_digest(training_checkpoint(other, config)) != state_digest(training_checkpoint(whole, config))


def test_state_digest_sees_one_ulp_of_an_optimizer_moment(config):
    state = _fresh(config)
    ckpt = training_checkpoint(state, config)
    before = state_digest(ckpt)
    assert before == state_digest(training_checkpoint(_fresh(config), config))
    ckpt["optimizer"]["state"] = {0: {"exp_avg": torch.zeros(3)}}
    with_moment = state_digest(ckpt)
    ckpt["optimizer"]["state"][0]["exp_avg"][1] = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0))
    assert len({before, with_moment, state_digest(ckpt)}) == 3


def test_step_seed_differs_by_seed_rank_and_step():
    seeds = {step_seed(s, r, t) for s in range(3) for r in range(3) for t in range(50)}
    assert len(seeds) == 3 * 3 * 50 and all(0 <= s < 2 ** 63 for s in seeds)
    assert step_seed(1, 2, 3) == step_seed(1, 2, 3)
