"""pfsr.data: the streaming train loader (splits, position, few shards, S3), validation images, unsafe tars, and
the shards read by plain webdataset and by Ray Data."""
from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from pfsr import storage
from pfsr.config import load_config
from pfsr.data import (ShardStream, combine_positions, iter_shard_samples, list_shards, load_val_images,
                       loader_from_config, make_train_loader)
from pfsr.errors import InputError
from pfsr.pipeline.prep import prep

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos, ray_cluster) -> Path:
    """8 shards of 128 px sub-images of the photos (longer side 256)."""
    src = tmp_path_factory.mktemp("src")
    for name, img in photos.items():
        pil = Image.fromarray(img)
        pil.thumbnail((256, 256))
        pil.save(src / f"{name}.png")
    out = tmp_path_factory.mktemp("shards")
    prep(str(src), str(out), patch=128, step=96, min_shards=8)
    return out


def _keys(out: Path) -> list[str]:
    return pq.read_table(out / "manifest.parquet").column("key").to_pylist()


def _take(loader, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(loader, n))


def test_batches_are_hr_crops_in_unit_range(shards):
    loader = make_train_loader(str(shards), crop=64, scale=4, batch_size=4, num_workers=0, seed=3)
    batches = _take(loader, 3)
    assert all(b.shape == (4, 3, 64, 64) and b.dtype == torch.float32 for b in batches)
    assert min(b.min() for b in batches) >= 0 and max(b.max() for b in batches) <= 1
    again = _take(make_train_loader(str(shards), crop=64, scale=4, batch_size=4, num_workers=0, seed=3), 3)
    other = _take(make_train_loader(str(shards), crop=64, scale=4, batch_size=4, num_workers=0, seed=4), 3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not torch.equal(batches[0], other[0])
    with pytest.raises(InputError, match="multiple of the scale"):
        make_train_loader(str(shards), crop=66, scale=4, batch_size=4)


@pytest.mark.parametrize("world_size,num_workers", [(2, 2), (2, 8)])  # 4 slots: shard split; 16: sample split
def test_ranks_and_workers_see_disjoint_parts_that_cover_the_epoch(shards, world_size, num_workers):
    urls = list_shards(str(shards))
    stream = ShardStream(urls, crop=64, batch_size=4, rank=0, world_size=world_size, num_workers=num_workers,
                         seed=0, shuffle_buffer=16, augment=True, starts=[(0, 0)] * num_workers)
    for epoch in (0, 1):
        parts = [[s["__key__"] for s in stream.slot_samples(epoch, slot)] for slot in range(stream.n_slots)]
        flat = [k for part in parts for k in part]
        assert sorted(flat) == sorted(_keys(shards)) and len(set(flat)) == len(flat)
        assert all(parts)  # no slot starves


def test_position_restores_exactly(shards):
    kwargs = dict(crop=64, scale=4, batch_size=4, num_workers=2, seed=1, shuffle_buffer=32)
    loader = make_train_loader(str(shards), **kwargs)
    _take(loader, 23)  # more than one epoch of ~80 samples: both workers cross an epoch boundary
    position = json.loads(json.dumps(loader.position()))
    assert position["epoch"] >= 1 and position["samples_seen"] == 23 * 4
    expected = _take(loader, 5)
    resumed = make_train_loader(str(shards), **kwargs, position=position)
    got = _take(resumed, 5)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert resumed.position() == loader.position()
    # another worker count cannot resume per worker: it restarts the saved epoch
    other = make_train_loader(str(shards), **{**kwargs, "num_workers": 1}, position=position)
    assert other.position()["workers"] == [[position["epoch"], 0]]


def test_every_rank_resumes_from_the_combined_position(shards):
    kwargs = dict(crop=64, scale=4, batch_size=4, num_workers=0, world_size=2, seed=2)
    loaders = [make_train_loader(str(shards), rank=r, **kwargs) for r in range(2)]
    for loader in loaders:
        _take(loader, 7)
    combined = json.loads(json.dumps(combine_positions([loader.position() for loader in loaders])))
    assert combined["samples_seen"] == 2 * 7 * 4
    for rank, loader in enumerate(loaders):
        resumed = make_train_loader(str(shards), rank=rank, **kwargs, position=combined)
        assert all(torch.equal(a, b) for a, b in zip(_take(loader, 3), _take(resumed, 3)))


def test_fewer_shards_than_slots_does_not_hang(shards, tmp_path):
    one = list_shards(str(shards))[:1]  # 1 shard for 2 ranks x 2 workers: sample splitting
    for rank in range(2):
        batches = _take(make_train_loader(one[0], crop=64, scale=4, batch_size=2, rank=rank, world_size=2,
                                          num_workers=2, shuffle_buffer=4), 6)
        assert len(batches) == 6
    # fewer samples than slots: a clear error instead of a starving rank
    few = tmp_path / "few.tar"
    with tarfile.open(few, "w") as tf, tarfile.open(one[0]) as src:
        for member in src.getmembers()[:4]:  # 2 samples
            tf.addfile(member, src.extractfile(member))
    with pytest.raises(InputError, match="too few or too small samples"):
        _take(make_train_loader(str(few), crop=64, scale=4, batch_size=1, rank=1, world_size=2, num_workers=2), 1)


def test_s3_shards_stream_like_local_ones(shards, s3_bucket):
    prefix = f"s3://{s3_bucket}/shards"
    for url in list_shards(str(shards)):
        storage.write_bytes(f"{prefix}/{Path(url).name}", Path(url).read_bytes())
    kwargs = dict(crop=64, scale=4, batch_size=4, num_workers=2, seed=5, rank=1, world_size=2)
    local = _take(make_train_loader(str(shards), **kwargs), 4)
    remote = _take(make_train_loader(prefix, **kwargs), 4)
    assert all(torch.equal(a, b) for a, b in zip(local, remote))


def test_unsafe_member_names_are_refused(tmp_path):
    for name in ("../evil.png", "/abs/evil.png", "a/../../evil.png"):
        path = tmp_path / "bad.tar"
        with tarfile.open(path, "w") as tf:
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
        with pytest.raises(InputError, match="absolute path or '..'"):
            list(iter_shard_samples([str(path)]))


def test_plain_webdataset_reads_the_shards(shards):
    urls = list_shards(str(shards))
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "png", "json")
    rows = list(dataset)
    assert [k for k, _, _ in rows] == _keys(shards)
    key, img, meta = rows[0]
    assert img.dtype == np.uint8 and img.shape[2] == 3 and meta["key"] == key


def test_ray_data_reads_the_shards(shards, ray_cluster):
    import ray

    ds = ray.data.read_webdataset(list_shards(str(shards)))
    rows = ds.take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(_keys(shards))
    assert all(r["png"].shape[2] == 3 and r["png"].dtype == np.uint8 for r in rows)


def test_validation_images_from_shards_or_a_folder(shards, photo_dir, photos):
    from_shards = load_val_images(str(shards), limit=3, split="train")
    assert len(from_shards) == 3 and all(i.dtype == np.uint8 and i.shape[2] == 3 for i in from_shards)
    from_folder = load_val_images(str(photo_dir))
    assert len(from_folder) == len(photos)
    assert np.array_equal(from_folder[0], photos[sorted(photos)[0]])


def test_loader_from_the_tiny_config(shards):
    config = load_config(ROOT / "configs" / "tiny.yaml")
    batch = next(iter(loader_from_config(config, str(shards))))
    assert batch.shape == (config.data.batch_size, 3, config.data.crop, config.data.crop)
