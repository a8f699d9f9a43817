"""`pfsr prep` on the scikit-image photos and the bad-input zoo: local and S3 (moto server) as source and
destination, byte-identical reruns at any parallelism, a killed run resumed, layouts, leaks, storage."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pfsr import cli, storage
from pfsr.data import iter_shard_samples, list_shards
from pfsr.errors import InputError
from pfsr.pipeline.prep import detect_layout, prep, select_files
from tests.zoo import CONVERTED, MAX_PIXELS, MIN_SIZE, REJECTED, write_zoo

ROOT = Path(__file__).parents[1]
OPTS = dict(patch=128, step=96, min_size=MIN_SIZE, max_pixels=MAX_PIXELS, min_shards=8)
pytestmark = pytest.mark.ray


def _small(img: np.ndarray, side: int = 256) -> Image.Image:
    pil = Image.fromarray(img)
    pil.thumbnail((side, side))
    return pil


@pytest.fixture(scope="module")
def raw(tmp_path_factory, photos) -> Path:
    """The photos, longer side 256 (PNG and JPEG, in two folders), and the zoo."""
    root = tmp_path_factory.mktemp("raw")
    for i, (name, img) in enumerate(sorted(photos.items())):
        folder = root / ("indoor" if i % 2 else "outdoor")
        folder.mkdir(exist_ok=True)
        _small(img).save(folder / (f"{name}.png" if i % 3 else f"{name}.jpg"), quality=95)
    write_zoo(root / "zoo", photos["astronaut"])
    (root / "README.txt").write_text("not an image, and not named like one: rejected by its name\n")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _s3_files(uri: str) -> dict[str, bytes]:
    return {e.path: storage.read_bytes(storage.join(uri, e.path)) for e in storage.list_files(uri)}


@pytest.fixture(scope="module")
def clean(raw, tmp_path_factory, ray_cluster) -> Path:
    """One uninterrupted run, the reference for the others."""
    out = tmp_path_factory.mktemp("clean")
    prep(str(raw), str(out), **OPTS)
    return out


def test_shards_manifest_and_rejections(clean, raw):
    files = _files(clean)
    shards = sorted(n for n in files if n.endswith(".tar"))
    assert shards == [f"train-{i:06d}.tar" for i in range(len(shards))] and len(shards) >= 8
    assert set(files) == set(shards) | {"manifest.parquet", "rejected.parquet", "dataset.json"}

    manifest = pq.read_table(clean / "manifest.parquet").to_pylist()
    samples = list(iter_shard_samples(list_shards(str(clean))))
    assert [s["__key__"] for s in samples] == [r["key"] for r in manifest]
    for row, sample in zip(manifest, samples):
        assert "." not in row["key"] and row["shard"] == sample["__url__"].rsplit("/", 1)[-1]
        meta = json.loads(sample["json"])
        assert meta["source"] == row["source"] and meta["crop"] == row["crop"]
        img = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert img.shape == (row["height"], row["width"], 3)
        assert hashlib.sha256(sample["png"]).hexdigest() == row["sha256"]
    # every member of a sample next to the other, fixed headers
    with tarfile.open(clean / shards[0]) as tf:
        members = tf.getmembers()
    assert [m.name.rsplit(".", 1)[0] for m in members[::2]] == [m.name.rsplit(".", 1)[0] for m in members[1::2]]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}

    rejected = {r["source"]: r["reason"] for r in pq.read_table(clean / "rejected.parquet").to_pylist()}
    assert set(rejected) == {f"zoo/{n}" for n in REJECTED} | {"README.txt"}
    assert rejected["README.txt"] == "not an image extension"
    for name, phrase in REJECTED.items():
        assert phrase in rejected[f"zoo/{name}"] and "\n" not in rejected[f"zoo/{name}"]
    notes = {r["source"]: r["notes"] for r in manifest}
    for name, phrase in CONVERTED.items():
        assert phrase in notes[f"zoo/{name}"], (name, notes.get(f"zoo/{name}"))

    info = json.loads((clean / "dataset.json").read_text())["splits"]["train"]
    assert info["samples"] == len(manifest) and info["rejected"] == len(REJECTED) + 1
    assert info["images"] == 8 + len(CONVERTED) and info["options"]["patch"] == 128
    assert sum(s["bytes"] for s in info["shards"]) == sum(len(files[n]) for n in shards)


def test_rerun_is_byte_identical_at_other_parallelism(clean, raw, tmp_path):
    out = tmp_path / "serial"
    prep(str(raw), str(out), concurrency=1, **OPTS)
    assert _files(out) == _files(clean)
    # the finished output is left alone; other options are refused rather than overwriting it
    before = _files(out)
    assert prep(str(raw), str(out), concurrency=3, **OPTS)["samples"] == len(pq.read_table(out / "manifest.parquet"))
    assert _files(out) == before
    with pytest.raises(InputError, match="already holds split 'train' made from other"):
        prep(str(raw), str(out), **{**OPTS, "step": 64})


def test_s3_source_and_destination(clean, raw, s3_bucket):
    src, out = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/shards"
    for path, data in _files(raw).items():
        storage.write_bytes(f"{src}/{path}", data)
    prep(src, out, **OPTS)
    got, want = _s3_files(out), _files(clean)
    assert set(got) == set(want)
    assert all(got[n] == want[n] for n in want if n != "dataset.json")  # dataset.json names its source
    assert json.loads(got["dataset.json"])["splits"]["train"]["source"] == src


def test_killed_run_resumes_to_the_clean_result(clean, raw, tmp_path, ray_cluster):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pfsr", "prep", "--source", str(raw), "--out", str(out), "--patch", "128",
           "--step", "96", "--min-size", str(MIN_SIZE), "--max-pixels", str(MAX_PIXELS), "--concurrency", "1",
           "--ray-address", address]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("train-*.tar")):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard appeared in 120 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started, midway
        proc.wait()
    assert not (out / "manifest.parquet").exists()
    done = list((out / "_progress" / "train").glob("*.tar.json"))
    assert len(done) < len(list(clean.glob("*.tar")))

    prep(str(raw), str(out), **OPTS)
    assert _files(out) == _files(clean)


def test_missing_or_empty_source_fails_at_once(tmp_path, capsys):
    assert cli.main(["prep", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert cli.main(["prep", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _tree(root: Path, names: list[str], img: Image.Image) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith((".png", ".jpg", ".JPEG")):
            img.save(root / name, format="PNG" if name.endswith(".png") else "JPEG")
    return root


def test_layouts_are_detected_and_split(tmp_path, photos):
    img = _small(photos["chelsea"], 96)
    div2k = _tree(tmp_path / "div2k", ["DIV2K_train_HR/0001.png", "DIV2K_train_HR/0002.png",
                                       "DIV2K_valid_HR/0801.png"], img)
    imagenet = _tree(tmp_path / "imagenet", ["train/n01440764/a.JPEG", "train/n01443537/b.JPEG",
                                             "val/ILSVRC2012_val_00000001.JPEG"], img)
    (imagenet / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n"
                                                   "ILSVRC2012_val_00000001,n01751748 1 2 3 4\n")
    celeba = _tree(tmp_path / "celeba", [f"img_align_celeba/00000{i}.jpg" for i in range(1, 5)], img)
    (celeba / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n")
    folder = _tree(tmp_path / "folder", ["a/x.png", "a/b/y.jpg", "z.png"], img)

    def split(root, split):
        entries = storage.list_files(root)
        layout, found = detect_layout(entries)
        return layout, found, [(f.path, f.label) for f in select_files(str(root), entries, layout, split)]

    layout, found, files = split(div2k, "val")
    assert layout == "div2k" and "DIV2K_train_HR/ with 2 images" in found
    assert files == [("DIV2K_valid_HR/0801.png", None)]
    layout, found, files = split(imagenet, "train")
    assert layout == "imagenet" and "2 classes" in found
    assert files == [("train/n01440764/a.JPEG", "n01440764"), ("train/n01443537/b.JPEG", "n01443537")]
    assert split(imagenet, "val")[2] == [("val/ILSVRC2012_val_00000001.JPEG", "n01751748")]
    layout, _, files = split(celeba, "train")
    assert layout == "celeba"
    assert [f for f, _ in files] == ["img_align_celeba/000001.jpg", "img_align_celeba/000002.jpg"]
    assert [f for f, _ in split(celeba, "test")[2]] == ["img_align_celeba/000004.jpg"]
    assert split(folder, "val") == ("folder", "3 images in 3 folders", [("a/b/y.jpg", None), ("a/x.png", None),
                                                                        ("z.png", None)])
    with pytest.raises(InputError, match="no public test"):
        split(div2k, "test")


def test_splits_share_an_output_and_leaks_are_reported(tmp_path, photos, ray_cluster):
    coffee = _small(photos["coffee"], 128)
    src = _tree(tmp_path / "div2k", ["DIV2K_train_HR/0001.png", "DIV2K_valid_HR/0801.png"], coffee)
    _small(photos["rocket"], 128).save(src / "DIV2K_train_HR/0002.png")
    out = tmp_path / "out"
    prep(str(src), str(out), split="train", **{**OPTS, "patch": 0, "min_shards": 2})
    prep(str(src), str(out), split="val", **{**OPTS, "patch": 0, "min_shards": 2})
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [(r["split"], r["source"]) for r in manifest] == [
        ("train", "DIV2K_train_HR/0001.png"), ("train", "DIV2K_train_HR/0002.png"), ("val", "DIV2K_valid_HR/0801.png")]
    leaks = json.loads((out / "dataset.json").read_text())["leaks"]
    assert leaks["count"] == 1
    assert leaks["examples"][0]["keys"] == {"train": ["DIV2K_train_HR/0001_png_0000"],
                                            "val": ["DIV2K_valid_HR/0801_png_0000"]}


def test_storage_writes_are_atomic_locally_and_on_s3(tmp_path, s3_bucket):
    for root in (str(tmp_path / "local"), f"s3://{s3_bucket}/p"):
        storage.write_bytes(storage.join(root, "a/b.bin"), b"x" * 10)
        storage.write_bytes(storage.join(root, "a/b.bin"), b"y" * 3)  # replaces
        assert storage.read_bytes(storage.join(root, "a/b.bin")) == b"yyy"
        assert storage.read_bytes(storage.join(root, "a/b.bin"), max_bytes=2) == b"yy"
        assert [(e.path, e.size) for e in storage.list_files(root)] == [("a/b.bin", 3)]
        assert storage.list_files(storage.join(root, "missing")) == []
        storage.delete_dir(storage.join(root, "a"))
        assert not storage.exists(storage.join(root, "a/b.bin"))

    target = tmp_path / "local" / "c.bin"
    with pytest.raises(TypeError):  # fails inside the write: neither the file nor its temp file is left
        storage.write_bytes(str(target), object())
    assert not target.exists() and list(target.parent.iterdir()) == []
    (target.parent / ".c.bin.x1y2.tmp").write_bytes(b"left by a killed writer")
    assert storage.clean_temp_files(str(target.parent)) == 1 and list(target.parent.iterdir()) == []
