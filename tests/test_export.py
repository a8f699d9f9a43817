"""`pfsr export`: a run directory (local or S3) -> serving checkpoint with the EMA weights and the config, best or
latest by the checkpoints' sidecars; anything that is not a PF-SR run or checkpoint is refused with a message."""
from __future__ import annotations

import json

import pytest
import torch

from pfsr import storage
from pfsr.checkpoint import (checkpoint_dir_name, find_checkpoint, load_model, save_checkpoint_dir,
                             training_checkpoint)
from pfsr.cli import main
from pfsr.config import load_config
from pfsr.models.sr import build_model
from pfsr.train import make_state


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as the Ray job leaves it: checkpoints at steps 10, 20, 30; step 20 validated best."""
    root = tmp_path_factory.mktemp("run")
    config = load_config("configs/tiny.yaml")
    torch.manual_seed(0)
    state = make_state(build_model(config), config)
    for step, psnr in [(10, 21.0), (20, 23.5), (30, None)]:
        state.step = step
        with torch.no_grad():  # distinct EMA weights per checkpoint
            next(state.ema.parameters()).fill_(float(step))
        metrics = {"train/loss_dsm": 1.0 / step} | ({"val/psnr_y": psnr} if psnr else {"val/psnr_y": float("nan")})
        save_checkpoint_dir(root / checkpoint_dir_name(step), training_checkpoint(state, config, metrics))
    (root / "tensorboard").mkdir()
    (root / "tensorboard" / "events.out.tfevents.0").write_bytes(b"x")
    return root


def _first_param(obj: dict) -> torch.Tensor:
    return next(iter(obj["model"].values()))


@pytest.mark.parametrize("which,step", [("best", 20), ("latest", 30)])
def test_export_local_run(run_dir, tmp_path, which, step):
    out = tmp_path / "model.pt"
    assert main(["export", "--run", str(run_dir), "--out", str(out), "--which", which]) == 0
    obj = torch.load(out, weights_only=True)
    assert obj["kind"] == "serving" and obj["step"] == step
    assert obj["config"]["model"]["scale"] == 4
    assert torch.all(_first_param(obj) == float(step))  # the EMA weights of that checkpoint
    assert "optimizer" not in obj and "ema" not in obj
    model = load_model(out)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_sidecar_drops_unvalidated_metric(run_dir):
    side = json.loads((run_dir / checkpoint_dir_name(30) / "metrics.json").read_text())
    assert side["step"] == 30 and "val/psnr_y" not in side["metrics"]


def test_export_from_s3_run_and_checkpoint_dir(run_dir, s3_bucket, tmp_path):
    prefix = f"s3://{s3_bucket}/runs/tiny"
    for path in run_dir.rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(prefix, path.relative_to(run_dir).as_posix()), path.read_bytes())
    assert find_checkpoint(prefix, "best") == f"{prefix}/checkpoint_000020/checkpoint.pt"
    assert find_checkpoint(prefix, "latest") == f"{prefix}/checkpoint_000030/checkpoint.pt"
    out = f"s3://{s3_bucket}/export/model.pt"
    assert main(["export", "--run", f"{prefix}/checkpoint_000010", "--out", out]) == 0
    local = tmp_path / "model.pt"
    local.write_bytes(storage.read_bytes(out))
    assert torch.load(local, weights_only=True)["step"] == 10


def test_export_of_serving_checkpoint_is_identity(run_dir, tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    assert main(["export", "--run", str(run_dir), "--out", str(first)]) == 0
    assert main(["export", "--run", str(first), "--out", str(second)]) == 0
    assert torch.equal(_first_param(torch.load(first, weights_only=True)),
                       _first_param(torch.load(second, weights_only=True)))


def test_export_refuses_what_is_not_a_run(photo_dir, tmp_path, capsys):
    assert main(["export", "--run", str(photo_dir), "--out", str(tmp_path / "x.pt")]) == 2
    assert "is not a PF-SR run or checkpoint" in capsys.readouterr().err
    png = next(photo_dir.glob("*.png"))
    assert main(["export", "--run", str(png), "--out", str(tmp_path / "x.pt")]) == 2
    assert f"{png} is not a PF-SR checkpoint" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path / "missing"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    assert main(["export", "--run", str(tmp_path / "foreign.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "no 'format': 'pfsr' entry" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
