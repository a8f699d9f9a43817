"""What a hostile try of the product found (issue 16): every input file accounted for by prep, symlink loops,
and clear errors (exit 2 with the file, flag or endpoint named) where tracebacks were."""
from __future__ import annotations

import io
import os
import re
import socket
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pfsr import storage
from pfsr.checkpoint import load_model, save
from pfsr.cli import main
from pfsr.errors import InputError
from pfsr.pipeline.prep import prep

ROOT = Path(__file__).parents[1]
OPTS = dict(patch=0, step=1, min_size=16, min_shards=1)


def _png(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="PNG")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tables(out: Path) -> tuple[list[dict], dict[str, str]]:
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    assert len({r["source"] for r in rejected}) == len(rejected)  # one rejected row per file
    return manifest, {r["source"]: r["reason"] for r in rejected}


@pytest.mark.ray
def test_prep_accounts_for_every_file_and_never_loops(tmp_path, photos, ray_cluster):
    src, outside = tmp_path / "raw", tmp_path / "outside"
    for path, name in [("a.png", "astronaut"), ("b.png", "coffee"), ("sub/c.png", "chelsea")]:
        _png(photos[name][:64, :64], src / path)
    _png(photos["rocket"][:64, :64], outside / "e.png")
    _png(photos["retina"][:64, :64], src / ".x.png")
    _png(photos["retina"][64:128, :64], src / ".cache" / "d.png")
    _png(photos["hubble_deep_field"][:64, :64], src / "image.txt")  # a valid PNG under another extension
    (src / "notes.md").write_text("not an image\n")
    os.symlink(".", src / "loop")
    os.symlink("sub", src / "alias")
    os.symlink("a.png", src / "link.png")
    os.link(src / "b.png", src / "hard.png")
    os.symlink("missing.png", src / "broken.png")
    os.symlink("self.png", src / "self.png")
    os.symlink(outside, src / "ext")
    os.symlink(outside, src / "ext2")
    os.symlink(src, outside / "back")
    out = tmp_path / "out"
    prep(str(src), str(out), **OPTS)
    manifest, rejected = _tables(out)
    # whole images (patch 0): one sample each, every image once however many paths lead to it
    assert sorted(r["source"] for r in manifest) == ["a.png", "b.png", "ext/e.png", "sub/c.png"]
    assert rejected == {
        ".cache/d.png": "hidden", ".x.png": "hidden",
        "alias": "duplicate of sub/", "ext2": "duplicate of ext/", "hard.png": "duplicate of b.png",
        "link.png": "duplicate of a.png",
        "broken.png": "broken symlink (-> missing.png)", "self.png": "looping symlink (-> self.png)",
        "loop": "looping symlink (-> ., a folder above it)",
        "ext/back": f"looping symlink (-> {src}, a folder above it)",
        "image.txt": "not an image extension", "notes.md": "not an image extension"}


@pytest.mark.ray
def test_prep_on_s3_skips_folder_markers(s3_bucket, photos, tmp_path, ray_cluster):
    import boto3

    client = boto3.client("s3")
    for key, body in [("raw/a.png", None), ("raw/sub/", b""), ("raw/.x.png", None), ("raw/notes.txt", b"text")]:
        if body is None:
            buf = io.BytesIO()
            Image.fromarray(photos["coffee"][:64, :64]).save(buf, format="PNG")
            body = buf.getvalue()
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    prep(f"s3://{s3_bucket}/raw", str(tmp_path / "out"), **OPTS)
    manifest, rejected = _tables(tmp_path / "out")
    assert [r["source"] for r in manifest] == ["a.png"]
    assert rejected == {".x.png": "hidden", "notes.txt": "not an image extension"}


def test_an_unreachable_s3_endpoint_is_named(monkeypatch, tmp_path, capsys):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-000000.tar").write_bytes(b"")  # local shards, run storage on S3
    tiny = str(ROOT / "configs" / "tiny.yaml")
    for argv in (["prep", "--source", "s3://bucket/raw", "--out", str(tmp_path / "out")],
                 ["train", "--config", tiny, "--data", "s3://bucket/shards"],
                 ["train", "--config", tiny, "--data", str(tmp_path / "shards"), "--storage", "s3://bucket/runs"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"at endpoint {endpoint}" in err and "check AWS_ENDPOINT_URL" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_train_refuses_steps_below_one(tmp_path, capsys):
    for steps in ("0", "-3"):
        argv = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data", str(tmp_path), "--steps", steps]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"--steps must be at least 1, got {steps}" in err and "tiny.yaml" not in err, err


@pytest.fixture
def damaged(tiny_checkpoint, tmp_path) -> dict[str, Path]:
    """Checkpoints without their config, without their weights, and with weights that miss a tensor."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    first = next(iter(ckpt["model"]))
    variants = {"no_config": {k: v for k, v in ckpt.items() if k != "config"},
                "no_weights": {k: v for k, v in ckpt.items() if k != "model"},
                "short_weights": {**ckpt, "model": {k: v for k, v in ckpt["model"].items() if k != first}}}
    paths = {}
    for name, obj in variants.items():
        save(obj, tmp_path / f"{name}.pt")
        paths[name] = tmp_path / f"{name}.pt"
    return paths


def test_a_damaged_checkpoint_is_named_with_what_it_lacks(damaged, tmp_path, capsys):
    expected = {"no_config": "has no 'config' entry", "no_weights": "has no 'model' entry",
                "short_weights": "its 'model' weights do not fit its config: Error(s) in loading state_dict"}
    for name, phrase in expected.items():
        with pytest.raises(InputError, match=rf"^{re.escape(str(damaged[name]))}: .*{re.escape(phrase)}"):
            load_model(damaged[name])
    _png(torch.zeros(16, 16, 3, dtype=torch.uint8).numpy(), tmp_path / "in.png")
    for name, phrase in expected.items():
        # `pfsr serve` checks the checkpoint before starting Ray and deploying (it used to wait 30 s, then say
        # "Deploying application pfsr failed"); `pfsr upscale` names the file too
        for argv in (["serve", "--checkpoint", str(damaged[name])],
                     ["upscale", str(tmp_path / "in.png"), str(tmp_path / "o.png"), "--checkpoint",
                      str(damaged[name])]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert str(damaged[name]) in err and phrase in err, err
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["serve", "--checkpoint", str(bad)]) == 2
    assert "is not a PF-SR checkpoint (torch.load failed" in capsys.readouterr().err


def test_upscale_into_a_folder_named_like_a_png(tiny_checkpoint, photos, tmp_path, capsys):
    _png(photos["coffee"][:16, :20], tmp_path / "in" / "cup.png")
    (tmp_path / "out.png").mkdir()
    base = ["--checkpoint", str(tiny_checkpoint), "--sampler", "dpmpp_2m", "--steps", "1", "--device", "cpu"]
    # an existing folder is written into, whatever its name
    assert main(["upscale", str(tmp_path / "in" / "cup.png"), str(tmp_path / "out.png"), *base]) == 0
    assert Image.open(tmp_path / "out.png" / "cup.png").size == (80, 64)
    # a folder where a batch's output file should go: refused before any work, nothing written
    (tmp_path / "batch" / "cup.png").mkdir(parents=True)
    assert main(["upscale", str(tmp_path / "in"), str(tmp_path / "batch"), *base]) == 2
    assert "batch/cup.png is an existing folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["cup.png", "cup.png"]  # in, out.png/


def test_export_names_a_bad_sidecar_and_refuses_a_folder_as_out(damaged, tiny_checkpoint, tmp_path, capsys):
    from pfsr.checkpoint import SIDECAR_FILE, checkpoint_dir_name, save_checkpoint_dir

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    training = {**ckpt, "kind": "training", "ema": ckpt["model"], "optimizer": {}, "scheduler": {}}
    run = tmp_path / "run"
    save_checkpoint_dir(run / checkpoint_dir_name(10), training)
    (tmp_path / "folder").mkdir()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "folder")]) == 2
    assert f"--out {tmp_path / 'folder'} is a directory" in capsys.readouterr().err
    sidecar = run / checkpoint_dir_name(10) / SIDECAR_FILE
    sidecar.write_text("{not json")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{sidecar} is not JSON" in err and "Traceback" not in err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.ray
def test_evaluate_names_the_shard_of_an_unsafe_member(ray_cluster, tiny_checkpoint, photos, tmp_path, capsys,
                                                       monkeypatch):
    import logging

    from pfsr.data import iter_shard_samples

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # evaluate's basicConfig: this test's stderr
    buf = io.BytesIO()
    Image.fromarray(photos["coffee"][:64, :64]).save(buf, format="PNG")
    for member, folder in (("/abs/x.png", tmp_path / "abs"), ("../x.png", tmp_path / "shards")):
        folder.mkdir()
        with tarfile.open(folder / "val-000000.tar", "w") as tf:
            info = tarfile.TarInfo(member)
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(InputError, match=re.escape(f"shard {tmp_path / 'abs' / 'val-000000.tar'}: tar member "
                                                   "'/abs/x.png' has an absolute path or '..'; refusing the shard")):
        list(iter_shard_samples([str(tmp_path / "abs" / "val-000000.tar")]))
    shards = tmp_path / "shards"
    argv = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(shards), "--out", str(tmp_path / "o"),
            "--sampler", "dpmpp_2m", "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # one line naming the shard and the member, after Ray Data's progress lines, and no traceback
    assert err.endswith(f"pfsr evaluate: error: shard {shards / 'val-000000.tar'}: tar member '../x.png' has an "
                        "absolute path or '..'; refusing the shard\n") and "Traceback" not in err, err
    assert not storage.exists(str(tmp_path / "o"))
