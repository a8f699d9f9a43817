"""Streaming loader of `pfsr prep` shards (local or S3) for training, and HR images for validation. No Ray.

Training stream, per loader slot (slot = rank x num_workers + DataLoader worker), one epoch after another:
  shards in a per-epoch permutation (seed, epoch) -> this slot's part -> tar members (webdataset's tar
  expander and key grouping; absolute member paths and '..' are refused) -> shuffle buffer seeded by
  (seed, epoch, slot) -> random HR crop + flips/90-degree rotations seeded per sample -> batches of uint8.
The stream never ends: training counts steps, and no rank runs dry before another (DDP would hang).

Fewer shards than slots: every slot reads all shards and keeps every n-th sample (sample splitting), so each
sample is still used once per epoch and no slot starves; with at least as many shards as slots, shards are
split. Sample splitting reads the data n_slots / n_shards times over, which only small data sets need.

Position: each batch carries (worker, epoch, samples read in that epoch); `position()` holds them per worker,
and a loader built with that position resumes every worker exactly where it stopped, batches in the same order
(DataLoader serves its workers round-robin; the worker roles are rotated to match).
"""
from __future__ import annotations

import json
import random
import re
import sys
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import images, masks, storage
from .errors import InputError

SAMPLE_EXTENSIONS = ("png", "webp")
EMPTY_EPOCHS_LIMIT = 3  # consecutive epochs without a usable sample before a slot gives up with an error


def list_shards(uri: str, split: str = "train") -> list[str]:
    """A shard folder/prefix (its `{split}-NNNNNN.tar`, in order), one .tar, or a brace pattern
    ('s3://b/p/train-{000000..000007}.tar') -> shard URIs."""
    uri = str(uri)
    if "{" in uri:
        return list(wds.shardlists.expand_urls(uri))
    if uri.endswith(".tar"):
        return [uri]
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")
    return [storage.join(uri, e.path) for e in storage.list_files(uri, recursive=False) if pattern.match(e.path)]


def check_member_name(name: str) -> str:
    """Refuse tar members that would escape a folder if extracted (absolute paths, '..')."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise InputError(f"tar member {name!r} has an absolute path or '..'; refusing the shard")
    return name


def _open_shards(urls: list[str]) -> Iterator[dict]:
    for url in urls:
        with storage.open_input_stream(url) as stream:
            yield {"url": url, "stream": stream}


def iter_shard_samples(urls: list[str]) -> Iterator[dict]:
    """Raw webdataset samples ({'__key__', 'png' or 'webp', 'json', ...} of bytes) of the shards, in order; an
    unsafe member is an InputError that names its shard."""
    for url in urls:
        files = wds.tariterators.tar_file_expander(_open_shards([url]))
        yield from wds.tariterators.group_by_keys(_safe_members(files, url))


def _safe_members(files: Iterator[dict], url: str) -> Iterator[dict]:
    # checked here rather than in webdataset's rename_files, whose handler buries the message under the stream
    for f in files:
        if "fname" in f:  # not the end-of-shard marker
            try:
                check_member_name(f["fname"])
            except InputError as e:
                raise InputError(f"shard {url}: {e}") from None
        yield f


def sample_image(sample: dict) -> np.ndarray:
    """The HR image [H x W x 3] uint8 of a raw shard sample."""
    for ext in SAMPLE_EXTENSIONS:
        if ext in sample:
            return images.load_rgb(sample[ext], sample["__key__"])
    raise InputError(f"sample {sample['__key__']} of {sample.get('__url__')} has no {' or '.join(SAMPLE_EXTENSIONS)} "
                     "member")


def sample_meta(sample: dict) -> dict:
    return json.loads(sample["json"]) if "json" in sample else {}


def iter_images(uri: str, split: str = "val", limit: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, HR [H x W x 3] uint8) from shards (`{split}-*.tar` under uri, or a .tar), a folder of images or
    one image file; in name order, at most `limit`. Unusable image files are skipped with a message."""
    shards = list_shards(uri, split)
    count = 0
    if shards:
        for sample in iter_shard_samples(shards):
            if limit is not None and count >= limit:
                return
            yield sample["__key__"], sample_image(sample)
            count += 1
        return
    if storage.is_file(uri):
        names, root = [uri.rsplit("/", 1)[-1]], uri.rsplit("/", 1)[0] if "/" in uri else "."
    else:
        names, root = [e.path for e in storage.list_files(uri) if images.is_image_name(e.path)], uri
    if not names:
        raise InputError(f"{uri}: no {split}-*.tar shards and no images")
    for name in names:
        if limit is not None and count >= limit:
            return
        try:
            decoded = images.decode_image(storage.read_bytes(storage.join(root, name)), name)
        except images.ImageRejected as e:
            print(f"data: skipping {e}", file=sys.stderr)
            continue
        yield name, decoded.rgb
        count += 1


def load_val_images(uri: str, limit: int | None = None, split: str = "val") -> list[np.ndarray]:
    """HR images [H x W x 3] uint8 for validation (see `iter_images`). Shards of `pfsr prep --patch 0` hold
    whole images; with sub-images the validation runs on the sub-images."""
    return [img for _, img in iter_images(uri, split, limit)]


def random_crop_augment(img: np.ndarray, crop: int, rng: np.random.Generator, augment: bool) -> np.ndarray:
    """[H x W x 3] -> random [crop x crop x 3], then BasicSR's augment: hflip, vflip, transpose, each p = 0.5."""
    return random_crop_augment_with_mask(img, None, crop, rng, augment)[0]


def random_crop_augment_with_mask(img: np.ndarray, mask: np.ndarray | None, crop: int, rng: np.random.Generator,
                                  augment: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """`random_crop_augment` of img [H x W x 3] and the same crop, flips and transpose of its mask [H x W]."""
    h, w = img.shape[:2]
    top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    out = [a[top:top + crop, left:left + crop] if a is not None else None for a in (img, mask)]
    if augment:
        hflip, vflip, rot90 = rng.random(3) < 0.5
        for i, a in enumerate(out):
            if a is None:
                continue
            if hflip:
                a = a[:, ::-1]
            if vflip:
                a = a[::-1]
            if rot90:
                a = a.swapaxes(0, 1)
            out[i] = a
    return out[0], out[1]


def sample_mask(sample: dict, shape: tuple[int, int]) -> np.ndarray:
    """The label mask [H x W] int32 of a raw shard sample (seed 002, `pfsr prep --masks`)."""
    if masks.MASK_MEMBER not in sample:
        raise InputError(f"sample {sample['__key__']} of {sample.get('__url__')} has no {masks.MASK_MEMBER} member: "
                         "make the shards with `pfsr prep --masks felzenszwalb|slic` or `--masks-from DIR`")
    labels = masks.decode_label_png(sample[masks.MASK_MEMBER])
    if labels.shape != shape:
        raise InputError(f"sample {sample['__key__']}: mask {labels.shape[1]}x{labels.shape[0]} does not match its "
                         f"image {shape[1]}x{shape[0]}")
    return labels


class ShardStream(IterableDataset):
    """Infinite stream of (HR uint8 [B x 3 x crop x crop], worker, epoch, samples read in that epoch) for one
    rank; the DataLoader worker runs the slots named in the module docstring. with_masks: the first item is
    (HR, masks int32 [B x crop x crop])."""

    def __init__(self, shards: list[str], *, crop: int, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int, shuffle_buffer: int, augment: bool,
                 starts: list[tuple[int, int]], rotation: int = 0, with_masks: bool = False):
        super().__init__()
        self.with_masks = with_masks
        self.shards, self.crop, self.batch_size = shards, crop, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.seed, self.shuffle_buffer, self.augment = seed, shuffle_buffer, augment
        self.starts, self.rotation = starts, rotation

    @property
    def n_slots(self) -> int:
        return self.world_size * self.num_workers

    def slot_samples(self, epoch: int, slot: int) -> Iterator[dict]:
        """Raw samples of one slot in one epoch, before shuffling."""
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.shards))
        shards = [self.shards[i] for i in order]
        if len(shards) >= self.n_slots:
            return iter_shard_samples(shards[slot::self.n_slots])
        samples = iter_shard_samples(shards)
        return (s for i, s in enumerate(samples) if i % self.n_slots == slot)

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.num_workers
        slot = self.rank * self.num_workers + worker
        epoch, skip = self.starts[worker]
        batch: list[np.ndarray] = []
        mask_batch: list[np.ndarray] = []
        empty_epochs, warned = 0, False
        while True:
            rng = random.Random(f"{self.seed}/{epoch}/{slot}")
            stream = wds.filters.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(
                self.slot_samples(epoch, slot))
            used = 0
            for index, sample in enumerate(stream, 1):
                if index <= skip:
                    continue
                img = sample_image(sample)
                if min(img.shape[:2]) < self.crop:
                    if not warned:
                        print(f"data: skipping samples smaller than the {self.crop} px crop (first: "
                              f"{sample['__key__']}, {img.shape[1]}x{img.shape[0]})", file=sys.stderr)
                        warned = True
                    continue
                used += 1
                sample_rng = np.random.default_rng((self.seed, epoch, slot, index))
                mask = sample_mask(sample, img.shape[:2]) if self.with_masks else None
                hr_crop, mask_crop = random_crop_augment_with_mask(img, mask, self.crop, sample_rng, self.augment)
                batch.append(hr_crop)
                mask_batch.append(mask_crop)
                if len(batch) == self.batch_size:
                    hr = torch.from_numpy(np.stack(batch).transpose(0, 3, 1, 2).copy())
                    if self.with_masks:
                        hr = (hr, torch.from_numpy(np.stack(mask_batch)))
                    yield hr, worker, epoch, index
                    batch, mask_batch = [], []
            empty_epochs = 0 if used or skip else empty_epochs + 1
            if empty_epochs >= EMPTY_EPOCHS_LIMIT:
                raise InputError(
                    f"loader slot {slot} of {self.n_slots} (rank {self.rank}) got no sample of at least "
                    f"{self.crop}x{self.crop} in {EMPTY_EPOCHS_LIMIT} epochs from {len(self.shards)} shards: too "
                    "few or too small samples for this many ranks x workers")
            epoch, skip = epoch + 1, 0


class TrainLoader:
    """Iterable of HR batches [B x 3 x crop x crop] float32 in [0, 1] that never ends; `position()` /
    `state_dict()` give where it stands and `load_state_dict` (or make_train_loader(position=)) resumes there.

    Each `iter()` starts the DataLoader workers at the current position.
    """

    def __init__(self, shards: list[str], *, crop: int, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int, shuffle_buffer: int, augment: bool, position: dict | None = None,
                 with_masks: bool = False):
        self.shards, self.with_masks = shards, with_masks
        self.kwargs = dict(crop=crop, batch_size=batch_size, rank=rank, world_size=world_size,
                           num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer, augment=augment)
        self.num_workers = num_workers
        self._batches = 0
        self._workers = [[0, 0] for _ in range(max(1, num_workers))]
        if position is not None:
            self.load_state_dict(position)

    def _identity(self) -> dict:
        k = self.kwargs
        return {"seed": k["seed"], "batch_size": k["batch_size"], "rank": k["rank"], "world_size": k["world_size"],
                "num_workers": self.num_workers, "shards": len(self.shards)}

    def position(self) -> dict:
        """{'epoch', 'samples_seen', 'batches', 'workers': [[epoch, samples read], ...], ...}: JSON-able."""
        return {"epoch": min(e for e, _ in self._workers), "samples_seen": self._batches * self.kwargs["batch_size"],
                "batches": self._batches, "workers": [list(w) for w in self._workers], **self._identity()}

    state_dict = position

    def load_state_dict(self, position: dict) -> None:
        """Resume from this rank's `position()`, or from `combine_positions` of every rank's."""
        if "ranks" in position:
            ranks = position["ranks"]
            mine = self.kwargs["rank"]
            same_world = len(ranks) == self.kwargs["world_size"]
            position = ranks[mine] if same_world else {**ranks[0], "rank": None, "epoch": position["epoch"]}
        saved = {k: position.get(k) for k in self._identity()}
        if saved == self._identity():
            self._batches = int(position["batches"])
            self._workers = [list(map(int, w)) for w in position["workers"]]
            return
        # Another world size, worker count or data: the per-worker positions do not carry over; restart the
        # saved epoch from its beginning (some samples of it are seen twice).
        changed = {k: (saved[k], v) for k, v in self._identity().items() if saved[k] != v}
        print(f"data: loader settings changed since the position was saved {changed}; restarting epoch "
              f"{position['epoch']}", file=sys.stderr)
        self._batches = int(position.get("batches", 0))
        self._workers = [[int(position["epoch"]), 0] for _ in self._workers]

    def __iter__(self) -> Iterator[Tensor]:
        n = len(self._workers)
        dataset = ShardStream(self.shards, **self.kwargs, starts=[tuple(w) for w in self._workers],
                              rotation=self._batches % n, with_masks=self.with_masks)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=4 if self.num_workers else None)
        for hr, worker, epoch, index in loader:
            self._workers[worker] = [int(epoch), int(index)]
            self._batches += 1
            if self.with_masks:
                hr, mask = hr
                yield hr.float().div_(255), mask
            else:
                yield hr.float().div_(255)


def combine_positions(positions: list[dict]) -> dict:
    """Every rank's `position()` (in rank order, e.g. from torch.distributed.all_gather_object) -> one JSON-able
    record that `make_train_loader(position=)` of each rank resumes from exactly."""
    return {"epoch": min(p["epoch"] for p in positions), "samples_seen": sum(p["samples_seen"] for p in positions),
            "ranks": positions}


def make_train_loader(uri: str, *, crop: int, scale: int, batch_size: int, rank: int = 0, world_size: int = 1,
                      num_workers: int = 1, seed: int = 0, shuffle_buffer: int = 256, augment: bool = True,
                      split: str = "train", position: dict | None = None, with_masks: bool = False) -> TrainLoader:
    """Training batches of this rank from the shards at `uri` (see the module docstring and `TrainLoader`).
    with_masks: each batch is (hr, mask), mask [B x crop x crop] int32 labels cropped, flipped and rotated with
    its HR crop (seed 002; the shards need `pfsr prep --masks`)."""
    if crop % scale:
        raise InputError(f"crop {crop} must be a multiple of the scale {scale}")
    if not 0 <= rank < world_size:
        raise InputError(f"rank {rank} must lie in [0, {world_size})")
    shards = list_shards(uri, split)
    if not shards:
        raise InputError(f"{uri}: no {split}-NNNNNN.tar shards (make them with `pfsr prep --split {split}`)")
    return TrainLoader(shards, crop=crop, batch_size=batch_size, rank=rank, world_size=world_size,
                       num_workers=num_workers, seed=seed, shuffle_buffer=shuffle_buffer, augment=augment,
                       position=position, with_masks=with_masks)


def loader_from_config(config, uri: str | None = None, *, rank: int = 0, world_size: int = 1,
                       position: dict | None = None) -> TrainLoader:
    """make_train_loader with the data section of a `pfsr.config.Config` (uri defaults to data.train)."""
    d = config.data
    uri = uri or d.train
    if not uri:
        raise InputError("data.train: no training shards given (set it in the config or pass --data)")
    return make_train_loader(uri, crop=d.crop, scale=config.model.scale, batch_size=d.batch_size, rank=rank,
                             world_size=world_size, num_workers=d.num_workers, seed=config.train.seed,
                             shuffle_buffer=d.shuffle_buffer, augment=d.augment, position=position,
                             with_masks=config.diffusion.noise_modulation == "structure")
