"""Seeds 002 and 004 through the Ray jobs: `pfsr prep --masks felzenszwalb`, `pfsr train` with structure-modulated
noise and with adaptive conditions, export and `pfsr evaluate` (which ignores the mask members and records the
prior), and the histogram prior equal on both ranks of a 2-worker Ray Train run (all-reduced counts).

Kept small for 2 shared cores: a reduced configs/tiny.yaml, 32 px crops, a few steps."""
from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

from pfsr.checkpoint import find_checkpoint, read_checkpoint
from pfsr.cli import main
from pfsr.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).parents[1]
SMALL = {"model.rrdb_num_feat": 8, "model.rrdb_num_block": 2, "model.rrdb_num_grow_ch": 8,
         "model.rrdb_feature_blocks": [0, 1], "model.unet_base_channels": 16, "model.unet_channel_mult": [1, 2],
         "model.unet_attention_levels": [1], "data.crop": 32, "data.batch_size": 2, "data.val_images": 1,
         "data.val_max_size": 32, "train.warmup_steps": 1, "train.log_every": 2, "train.val_every": 4,
         "train.checkpoint_every": 4, "train.steps": 4, "train.val_steps": 2, "model.adaptive_condition_dims": 8}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, **over) -> Path:
    """A YAML config over configs/tiny.yaml with SMALL and `over` (dotted keys)."""
    import yaml

    data: dict = {"base": str(ROOT / "configs" / "tiny.yaml")}
    for dotted, value in (SMALL | over).items():
        section, key = dotted.split(".")
        data.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def masked_shards(ray_cluster, photos, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seeds")
    out = {}
    for split, names in {"train": ["astronaut", "rocket", "chelsea"], "val": ["coffee"]}.items():
        src = root / f"src_{split}"
        src.mkdir()
        for name in names:
            pil = Image.fromarray(photos[name])
            pil.thumbnail((128, 128))
            pil.save(src / f"{name}.png")
        out[split] = root / f"shards_{split}"
        assert main(["prep", "--source", str(src), "--out", str(out[split]), "--split", split, "--patch", "64",
                     "--step", "64", "--min-shards", "2", "--masks", "felzenszwalb"]) == 0
    return out


def test_pfsr_train_runs_the_new_options(masked_shards, tmp_path):
    """One run with both: structure-modulated noise (seed 002) and adaptive conditions with the LR prior (004)."""
    config = write_config(tmp_path / "both.yaml", **{"diffusion.noise_modulation": "structure",
                                                     "diffusion.noise_modulation_scale": 1.0,
                                                     "model.adaptive_condition": "lr"})
    assert main(["train", "--config", str(config), "--data", str(masked_shards["train"]), "--val-data",
                 str(masked_shards["val"]), "--storage", str(tmp_path / "runs"), "--name", "both"]) == 0
    run = str(tmp_path / "runs" / "both")
    ckpt = read_checkpoint(find_checkpoint(run, "latest"), kind="training")
    assert ckpt["step"] == 4 and ckpt["config"]["diffusion"]["noise_modulation"] == "structure"
    assert torch.isfinite(torch.tensor(ckpt["metrics"]["train/loss_dsm"]))
    assert ckpt["metrics"]["train/loss_code"] > 0 and ckpt["ema"]["adaptive.histogram"].sum() > 0
    model = tmp_path / "qac.pt"
    assert main(["export", "--run", run, "--out", str(model)]) == 0
    # evaluation reads the masked val shards (their mask members ignored) and records the prior
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(model), "--data", str(masked_shards["val"]), "--out", str(out),
                 "--sampler", "dpmpp_2m", "--steps", "2", "--limit", "1"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["adaptive_condition"] == "adaptive condition: 8 dims x 2 levels, code from the lr prior " \
                                           "(LR predictor from RRDB features)"
    assert report["n_images"] == 1 and report["model"]["nfe"] == 2
    # Serve: the prior in the X-PFSR-Notes header
    import httpx
    from ray import serve

    from pfsr.config import ServeConfig
    from pfsr.pipeline.serve import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(str(model), ServeConfig(max_pixels=32 * 32, tile=32, token_env="PFSR_UNSET_TOKEN",
                                                    min_replicas=1, max_replicas=1)),
                  name="pfsr-seeds", route_prefix="/seeds")
        buf = io.BytesIO()
        Image.new("RGB", (12, 8), (90, 120, 30)).save(buf, format="PNG")
        r = httpx.post(f"http://127.0.0.1:{port}/seeds/upscale", content=buf.getvalue(),
                       params={"sampler": "dpmpp_2m", "steps": "2"}, headers={"Content-Type": "image/png"},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert "code from the lr prior" in r.headers["X-PFSR-Notes"]
        assert Image.open(io.BytesIO(r.content)).size == (48, 32)
    finally:
        serve.shutdown()


def test_histogram_prior_is_the_same_on_every_rank_of_a_two_worker_run(masked_shards, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    config = load_config(ROOT / "configs" / "tiny.yaml", SMALL | {"model.adaptive_condition": "histogram",
                                                                 "train.ema_decay": 0.5})

    def worker(cfg: dict) -> None:  # defined here: pickled by value for the workers
        import torch
        from torch.nn.parallel import DistributedDataParallel

        from pfsr.config import config_from_dict
        from pfsr.data import loader_from_config
        from pfsr.losses import TrainingObjective
        from pfsr.models.sr import build_model
        from pfsr.train import make_state, train_step

        torch.set_num_threads(1)
        rank = ray.train.get_context().get_world_rank()
        conf = config_from_dict(cfg["config"])
        torch.manual_seed(0)
        state = make_state(build_model(conf), conf)
        objective = DistributedDataParallel(TrainingObjective(state.model, conf.loss, "diffusion"))
        batches = iter(loader_from_config(conf, cfg["data"], rank=rank, world_size=2))
        generator = torch.Generator().manual_seed(rank)  # different noise and data on each rank
        for _ in range(3):
            train_step(objective, next(batches), state, conf, generator)
        torch.save(state.model.adaptive.histogram, f"{cfg['out']}/rank{rank}.pt")

    trainer = TorchTrainer(worker, train_loop_config={"config": config.to_dict(), "data": str(masked_shards["train"]),
                                                      "out": str(tmp_path)},
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"), name="hist"))
    trainer.fit()
    h0, h1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(h0, h1)
    # the counts of both ranks: sum = (1 - 0.5^3) x 2 ranks x batch 2 (one rank's alone would give half)
    assert h0.sum().item() == pytest.approx((1 - 0.5**3) * 2 * 2, abs=1e-6)
