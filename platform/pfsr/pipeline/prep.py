"""`pfsr prep`: shard a raw image data set (DIV2K, ImageNet, CelebA or any folder; local or S3) into
deterministic WebDataset tars with Ray Data.

Two Ray Data passes over the sorted file list:
  1. scan: read each file's header (its first 256 KiB) -> oriented size, or a rejection (empty, not an image,
     too many pixels - before any pixel is decoded -, too small). From the sizes the driver knows every sample
     (BasicSR sub-image boxes) in key order, and cuts that list into contiguous, equally long shards.
  2. write: one task per shard reads, decodes, crops and losslessly encodes its samples, writes the tar under
     its final name only when complete, then a small record of its manifest rows under `_progress/`.
So shard contents are a function of the input and the options alone, never of the parallelism or of timing.
A killed run started again skips the shards that have a record; the manifest is assembled from the records and
written last.

Listing: every file under the source is the `source` of manifest rows or of one rejected row with its reason
(hidden, not an image extension, broken or looping symlink, duplicate of an earlier path, or a reason from its
header or pixels); only images of another split of the layout are left out (counted in the log). A local symlink
to a folder or file inside the source is a duplicate of its real path; one that leads outside is followed once
(by its real path), never in a loop. S3 folder-marker keys (ending in '/') are not files.

Output, beside the shards `{split}-{index:06d}.tar`: manifest.parquet (one row per sample), rejected.parquet
(source, one-line reason), dataset.json (counts, options, version, leaks). Several splits may share one output
folder (run them one after another): the tables hold the rows of every split, and an image whose HR bytes occur
in two splits is reported as a leak.
"""
from __future__ import annotations

import argparse
import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import stat
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import ray

import pfsr

from .. import images, masks, storage
from ..errors import InputError

FORMAT_VERSION = 1
SCAN_BYTES = 256 << 10  # enough for the header of any common format; a miss falls back to the whole file
# Lossless bytes per RGB pixel of photos, to size the shards before encoding (PNG level 1 ~ 0.6 x 3 bytes).
BYTES_PER_PIXEL = {"png": 1.8, "webp": 1.4}
LAYOUTS = ("div2k", "imagenet", "celeba", "folder")
PROGRESS = "_progress"
TAR_MTIME = 0  # fixed tar header fields: byte-identical shards on every run and machine

MANIFEST_SCHEMA = pa.schema([("split", pa.string()), ("key", pa.string()), ("shard", pa.string()),
                             ("source", pa.string()), ("crop", pa.list_(pa.int32())), ("sha256", pa.string()),
                             ("width", pa.int32()), ("height", pa.int32()), ("label", pa.string()),
                             ("notes", pa.string()), ("mask", pa.string())])
REJECTED_SCHEMA = pa.schema([("split", pa.string()), ("source", pa.string()), ("reason", pa.string())])


def log(message: str) -> None:
    print(f"prep: {message}", flush=True)


@dataclass(frozen=True)
class Options:
    """What decides the bytes of the output (the fingerprint); parallelism is deliberately not part of it."""

    layout: str
    split: str
    patch: int
    step: int
    min_size: int
    max_pixels: int
    shard_size_mb: float
    min_shards: int
    format: str
    masks: str = "none"  # seed 002: a segmenter of pfsr.masks.SEGMENTERS, "file" (masks_from) or "none"
    masks_from: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Layouts: which files of the source belong to the split, with which label


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the source root, '/' separators
    size: int
    label: str | None = None


_WNID = re.compile(r"^n\d{8}$")
DIV2K_DIRS = {"train": "DIV2K_train_HR/", "val": "DIV2K_valid_HR/"}
CELEBA_SPLITS = {"train": "0", "val": "1", "test": "2"}


def _top_dirs(entries: list[storage.FileEntry]) -> Counter:
    return Counter(e.path.split("/", 1)[0] + "/" for e in entries if "/" in e.path and images.is_image_name(e.path))


def detect_layout(entries: list[storage.FileEntry]) -> tuple[str, str]:
    """-> (layout, what was found, in words)."""
    tops = _top_dirs(entries)
    names = {e.path for e in entries}
    div2k = [d for d in DIV2K_DIRS.values() if tops[d]]
    if div2k:
        return "div2k", ", ".join(f"{d} with {tops[d]} images" for d in div2k)
    if tops["img_align_celeba/"] and names & {"list_eval_partition.txt", "list_eval_partition.csv"}:
        return "celeba", f"img_align_celeba/ with {tops['img_align_celeba/']} images and its eval partition"
    classes = {e.path.split("/")[1] for e in entries if e.path.startswith("train/") and e.path.count("/") >= 2}
    if tops["train/"] and classes and all(_WNID.match(c) for c in classes):
        return "imagenet", f"train/ with {len(classes)} classes (wnid folders), {tops['train/']} images" + (
            f"; val/ with {tops['val/']} images" if tops["val/"] else "")
    n = sum(images.is_image_name(e.path) for e in entries)
    folders = len({e.path.rpartition("/")[0] for e in entries if images.is_image_name(e.path)})
    return "folder", f"{n} images" + (f" in {folders} folders" if folders > 1 else "")


def select_files(source: str, entries: list[storage.FileEntry], layout: str, split: str) -> list[SourceFile]:
    """The image files of `split` under `layout`, sorted by path (not yet checked to be images)."""
    imgs = [e for e in entries if images.is_image_name(e.path)]
    if layout == "div2k":
        if split not in DIV2K_DIRS:
            raise InputError(f"{source}: DIV2K has no public {split} HR images; use --split train or val")
        prefix = DIV2K_DIRS[split]
        files = [SourceFile(e.path, e.size) for e in imgs if e.path.startswith(prefix)]
        where = prefix
    elif layout == "imagenet":
        prefix = {"train": "train/", "val": "val/", "test": "test/"}[split]
        val_labels = _imagenet_val_labels(source, entries) if split == "val" else {}
        files = []
        for e in imgs:
            if not e.path.startswith(prefix):
                continue
            parts = e.path.split("/")
            label = parts[1] if len(parts) >= 3 else val_labels.get(parts[-1].rsplit(".", 1)[0])
            files.append(SourceFile(e.path, e.size, label))
        where = prefix
    elif layout == "celeba":
        partition = _celeba_partition(source, entries)
        want = CELEBA_SPLITS[split]
        files = [SourceFile(e.path, e.size) for e in imgs
                 if e.path.startswith("img_align_celeba/") and partition.get(e.path.rsplit("/", 1)[-1]) == want]
        where = f"img_align_celeba/ (partition {want} = {split})"
    elif layout == "folder":
        files = [SourceFile(e.path, e.size) for e in imgs]
        where = "the folder"
    else:
        raise InputError(f"unknown layout {layout!r}; choose auto or one of {', '.join(LAYOUTS)}")
    if not files:
        raise InputError(f"{source}: no images for split {split!r} in {where} (layout {layout})")
    return sorted(files, key=lambda f: f.path)


def _imagenet_val_labels(source: str, entries: list[storage.FileEntry]) -> dict[str, str]:
    """Flat val/: labels from Kaggle's LOC_val_solution.csv (ImageId, 'wnid x y x y ...') when present."""
    if not any(e.path == "LOC_val_solution.csv" for e in entries):
        return {}
    text = storage.read_bytes(storage.join(source, "LOC_val_solution.csv")).decode()
    rows = csv.reader(io.StringIO(text))
    next(rows, None)
    return {row[0]: row[1].split()[0] for row in rows if len(row) >= 2 and row[1].strip()}


def _celeba_partition(source: str, entries: list[storage.FileEntry]) -> dict[str, str]:
    """list_eval_partition.txt ('000001.jpg 0') or .csv ('image_id,partition') -> file name -> '0'|'1'|'2'."""
    for name in ("list_eval_partition.txt", "list_eval_partition.csv"):
        if any(e.path == name for e in entries):
            text = storage.read_bytes(storage.join(source, name)).decode()
            rows = [re.split(r"[,\s]+", line.strip()) for line in text.splitlines() if line.strip()]
            return {r[0]: r[1] for r in rows if len(r) >= 2 and r[1] in ("0", "1", "2")}
    raise InputError(f"{source}: the celeba layout needs list_eval_partition.txt beside img_align_celeba/")


# ---------------------------------------------------------------------------------------------------------
# Keys and the shard plan


def sample_key(path: str, index: int) -> str:
    """'DIV2K_train_HR/0001.png', 3 -> 'DIV2K_train_HR/0001_png_0003'. No dots: webdataset cuts member names at
    the first dot of the base name."""
    return f"{re.sub(r'[^A-Za-z0-9_/-]', '_', path)}_{index:04d}"


def num_shards(n_samples: int, n_bytes: float, shard_size_mb: float, min_shards: int) -> int:
    """About `shard_size_mb` each, never fewer than `min_shards` when there are that many samples."""
    if n_samples == 0:
        return 0
    by_size = math.ceil(n_bytes / (shard_size_mb * 2**20))
    return max(1, min(n_samples, max(by_size, min_shards)))


def make_plan(scanned: list[dict], opts: Options) -> tuple[list[dict], list[dict]]:
    """Scan rows (sorted by path) -> (shard plans, rejections).

    Samples in key order are cut into equal contiguous runs, one per shard; a plan lists per image its crops.
    """
    samples = []  # (path, label, width, height, crop index, box, key)
    rejected = []
    seen_keys: dict[str, str] = {}
    for row in scanned:
        if row["reason"]:
            rejected.append({"source": row["path"], "reason": row["reason"]})
            continue
        boxes = images.subimage_boxes(row["width"], row["height"], opts.patch, opts.step)
        key0 = sample_key(row["path"], 0)
        if key0 in seen_keys:  # names that differ only in punctuation
            reason = f"key collision: its keys equal those of {seen_keys[key0]}"
            rejected.append({"source": row["path"], "reason": reason})
            continue
        seen_keys[key0] = row["path"]
        label = row["label"] or None  # "" through Ray Data: a column of None would not keep its type
        for i, box in enumerate(boxes):
            samples.append((row["path"], label, row["width"], row["height"], i, box, sample_key(row["path"], i)))
    n_bytes = sum((b[2] - b[0]) * (b[3] - b[1]) for *_, b, _ in samples) * BYTES_PER_PIXEL[opts.format]
    n = num_shards(len(samples), n_bytes, opts.shard_size_mb, opts.min_shards)
    plans = []
    for s in range(n):
        items: list[dict] = []
        for path, label, w, h, i, box, key in samples[s * len(samples) // n:(s + 1) * len(samples) // n]:
            if not items or items[-1]["path"] != path:
                items.append({"path": path, "label": label, "width": w, "height": h, "crops": []})
            items[-1]["crops"].append([i, list(box), key])
        plans.append({"index": s, "name": shard_name(opts.split, s), "items": items})
    return plans, rejected


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------------------
# Ray Data stages (run in the workers)


def _scan_batch(batch: dict, *, source: str, max_pixels: int, min_size: int) -> dict:
    """Header of each file -> width, height (after EXIF orientation) or a one-line reason."""
    out = {"path": [], "label": [], "width": [], "height": [], "reason": []}
    for path, size, label in zip(batch["path"], batch["size"], batch["label"]):
        width = height = 0
        reason = ""
        try:
            partial = size > SCAN_BYTES
            data = storage.read_bytes(storage.join(source, path), max_bytes=SCAN_BYTES if partial else None)
            try:
                header = images.read_header(data, path, max_pixels=max_pixels, min_size=min_size)
            except images.ImageRejected:
                if not partial:
                    raise
                header = images.read_header(storage.read_bytes(storage.join(source, path)), path,
                                            max_pixels=max_pixels, min_size=min_size)
            width, height = header.width, header.height
        except images.ImageRejected as e:
            reason = e.reason
        except OSError as e:
            reason = f"unreadable file: {' '.join(str(e).split())}"
        out["path"].append(path)
        out["label"].append(label)
        out["width"].append(width)
        out["height"].append(height)
        out["reason"].append(reason)
    return out


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _write_shard(row: dict, *, source: str, out: str, opts: dict) -> dict:
    """Decode, crop, encode and pack one shard plan; write the tar, then its record. -> counts."""
    plan = json.loads(row["plan"])
    split, fmt = opts["split"], opts["format"]
    buf = io.BytesIO()
    manifest, rejected = [], []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for item in plan["items"]:
            path = item["path"]
            try:
                decoded = images.decode_image(storage.read_bytes(storage.join(source, path)), path,
                                              opts["max_pixels"], min_size=opts["min_size"])
            except images.ImageRejected as e:
                rejected.append({"source": path, "reason": e.reason})
                continue
            except OSError as e:
                rejected.append({"source": path, "reason": f"unreadable file: {' '.join(str(e).split())}"})
                continue
            height, width = decoded.rgb.shape[:2]
            if (width, height) != (item["width"], item["height"]):
                rejected.append({"source": path, "reason": f"size mismatch: decoded {width}x{height}, header "
                                                           f"{item['width']}x{item['height']}"})
                continue
            try:
                labels = _image_mask(decoded.rgb, path, opts)
            except masks.MaskRejected as e:
                rejected.append({"source": path, "reason": e.reason})
                continue
            for index, box, key in item["crops"]:
                data = images.encode_image(images.crop(decoded.rgb, box), fmt)
                meta = {"key": key, "source": path, "crop": box, "original_size": [width, height],
                        "label": item["label"], "notes": decoded.notes, "split": split}
                mask_member = _mask_member(key, labels)
                if mask_member:
                    meta["mask"] = mask_member
                # Members of one sample stay next to each other: Ray's reader splits samples that are not.
                _tar_add(tf, f"{key}.{fmt}", data)
                _tar_add(tf, f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
                if mask_member:
                    _tar_add(tf, mask_member, masks.encode_label_png(images.crop(labels, box)))
                manifest.append({"split": split, "key": key, "shard": plan["name"], "source": path, "crop": box,
                                 "sha256": hashlib.sha256(data).hexdigest(), "width": box[2] - box[0],
                                 "height": box[3] - box[1], "label": item["label"], "notes": "; ".join(decoded.notes),
                                 "mask": mask_member})
    tar_bytes = buf.getvalue()
    storage.write_bytes(storage.join(out, plan["name"]), tar_bytes)
    record = {"shard": plan["name"], "manifest": manifest, "rejected": rejected, "bytes": len(tar_bytes)}
    storage.write_bytes(_record_uri(out, split, plan["name"]), json.dumps(record, sort_keys=True).encode())
    return {"shard": plan["name"], "samples": len(manifest), "images": len(plan["items"]) - len(rejected),
            "rejected": len(rejected), "bytes": len(tar_bytes)}


def _image_mask(rgb, path: str, opts: dict):
    """Seed 002: the label mask [H x W] of a whole image (before sub-images are cut), or None without masks.
    Raises masks.MaskRejected for a missing, unreadable or mis-sized user mask."""
    masks_from = opts.get("masks_from")

    def read(name: str):  # the user's mask beside the image's relative path: same stem, .png, .npy or .json
        stem = name.rsplit(".", 1)[0]
        for ext in masks.MASK_FILE_EXTENSIONS:
            uri = storage.join(masks_from, stem + ext)
            if storage.is_file(uri):
                return stem + ext, storage.read_bytes(uri)
        return None

    return masks.mask_for_image(rgb, path, masks=opts.get("masks", "none"), masks_from=masks_from, read=read)


def _mask_member(key: str, labels) -> str | None:
    return f"{key}.{masks.MASK_MEMBER}" if labels is not None else None


def _record_uri(out: str, split: str, name: str) -> str:
    return storage.join(out, PROGRESS, split, f"{name}.json")


# ---------------------------------------------------------------------------------------------------------
# Driver


def _fingerprint(opts: Options, files: list[SourceFile]) -> str:
    h = hashlib.sha256(json.dumps(asdict(opts), sort_keys=True).encode())
    for f in files:
        h.update(f"\n{f.path}\t{f.size}\t{f.label}".encode())
    return h.hexdigest()


def _read_json(uri: str) -> dict | None:
    return json.loads(storage.read_bytes(uri)) if storage.is_file(uri) else None


def _read_table(uri: str, schema: pa.Schema) -> pa.Table:
    if not storage.is_file(uri):
        return schema.empty_table()
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).cast(schema)


def _write_table(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def _merge(existing: pa.Table, split: str, rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Replace the rows of `split`, keep the other splits' rows; splits in name order."""
    others = [r for r in existing.to_pylist() if r["split"] != split]
    merged = sorted(others + rows, key=lambda r: r["split"])  # stable: order within a split is kept
    return pa.Table.from_pylist(merged, schema=schema)


def find_leaks(manifest: pa.Table) -> list[dict]:
    """HR contents (sha256) that occur in more than one split -> [{sha256, keys: {split: [keys]}}]."""
    by_hash: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for split, key, sha in zip(*(manifest.column(c).to_pylist() for c in ("split", "key", "sha256"))):
        by_hash[sha][split].append(key)
    return [{"sha256": sha, "keys": dict(splits)} for sha, splits in sorted(by_hash.items()) if len(splits) > 1]


def _init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    # Ship the package to the workers (a cluster started elsewhere need not have pfsr installed), unless the
    # submitted job's runtime env does already: Ray refuses to merge two py_modules.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    shipped = "py_modules" in (job.get("runtime_env") or {})
    package = os.path.dirname(os.path.abspath(pfsr.__file__))
    ray.init(address=address, runtime_env=None if shipped else {"py_modules": [package]})


def _walk_local(root: str) -> tuple[list[storage.FileEntry], list[dict]]:
    """Every file below the local folder `root` -> (entries sorted by path, rejections {"source", "reason"}).

    Symlinks: one to a folder or file inside `root` is a duplicate of its real path (or a loop when it leads to a
    folder above it); one that leads outside is followed once by its real path. Hard links: the first path wins.
    """
    real_root = os.path.realpath(root)
    entries: list[storage.FileEntry] = []
    rejected: list[dict] = []
    first_file: dict[tuple[int, int], str] = {}  # (device, inode) -> first path
    first_dir: dict[str, str] = {}  # real path of a followed outside folder -> its path

    def inside(real: str) -> bool:
        return real == real_root or real.startswith(real_root + os.sep)

    def walk(folder: str, rel: str, above: frozenset[str]) -> None:
        try:
            children = sorted(os.scandir(folder), key=lambda d: d.name)
        except OSError as e:
            rejected.append({"source": rel or ".", "reason": f"unreadable folder: {e.strerror}"})
            return
        for child in children:
            path = rel + child.name
            if child.is_symlink():
                target = os.readlink(child.path)
                try:
                    info = os.stat(child.path)
                except OSError as e:
                    kind = "looping symlink" if e.errno == errno.ELOOP else "broken symlink"
                    rejected.append({"source": path, "reason": f"{kind} (-> {target})"})
                    continue
                real = os.path.realpath(child.path)
                is_dir = stat.S_ISDIR(info.st_mode)
                if is_dir and real in above:
                    rejected.append({"source": path, "reason": f"looping symlink (-> {target}, a folder above it)"})
                    continue
                if inside(real):
                    first = os.path.relpath(real, real_root).replace(os.sep, "/") + ("/" if is_dir else "")
                    rejected.append({"source": path, "reason": f"duplicate of {first}"})
                    continue
                if is_dir:
                    if real in first_dir:
                        rejected.append({"source": path, "reason": f"duplicate of {first_dir[real]}/"})
                        continue
                    first_dir[real] = path
            else:
                info = child.stat(follow_symlinks=False)
                real = child.path
            if stat.S_ISDIR(info.st_mode):
                walk(child.path, path + "/", above | {os.path.realpath(real)})
            elif not stat.S_ISREG(info.st_mode):
                rejected.append({"source": path, "reason": "not a regular file"})
            elif (info.st_dev, info.st_ino) in first_file:
                rejected.append({"source": path, "reason": f"duplicate of {first_file[info.st_dev, info.st_ino]}"})
            else:
                first_file[info.st_dev, info.st_ino] = path
                entries.append(storage.FileEntry(path, info.st_size))

    if os.path.isdir(real_root):
        walk(real_root, "", frozenset({real_root}))
    return sorted(entries, key=lambda e: e.path), rejected


def _list_source(source: str, layout: str, split: str) -> tuple[str, list[SourceFile], list[dict]]:
    """-> (layout, the split's image files, rejections of the listing); fails at once on a missing or image-less
    source. Every file under the source is either one of the files or rejected, or an image of another split."""
    if not storage.exists(source):
        raise InputError(f"source {source} does not exist")
    if storage.is_s3(source):
        # folder markers ('photos/') are not files
        listed, rejected = [e for e in storage.list_files(source) if not e.path.endswith("/")], []
    else:
        listed, rejected = _walk_local(storage.resolve(source)[1])
    entries = []
    for e in listed:
        if any(part.startswith(".") for part in e.path.split("/")):
            rejected.append({"source": e.path, "reason": "hidden"})
        else:
            entries.append(e)
            if not images.is_image_name(e.path):
                # by name: a PNG named .txt is not read (a data set's .txt files are labels and lists)
                rejected.append({"source": e.path, "reason": "not an image extension"})
    if not any(images.is_image_name(e.path) for e in entries):
        raise InputError(f"source {source} holds no images (looked for {', '.join(images.IMAGE_EXTENSIONS)})")
    if layout == "auto":
        layout, found = detect_layout(entries)
        log(f"layout auto: {layout} ({found})")
    files = select_files(source, entries, layout, split)
    others = sum(images.is_image_name(e.path) for e in entries) - len(files)
    log(f"{len(files)} image files for split {split!r} in {source}; {len(rejected)} other files rejected "
        "(rejected.parquet)" + (f"; {others} images of other splits" if others else ""))
    return layout, files, sorted(rejected, key=lambda r: r["source"])


def _scan(files: list[SourceFile], source: str, opts: Options, concurrency: int | None) -> list[dict]:
    """Pass 1 on Ray Data: the header of every file; rows sorted by path."""
    n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items([{"path": f.path, "size": f.size, "label": f.label or ""} for f in files],
                             override_num_blocks=max(1, min(len(files), 4 * n_cpus)))
    rows = ds.map_batches(_scan_batch, batch_size=64, batch_format="numpy", num_cpus=1, concurrency=concurrency,
                          fn_kwargs=dict(source=source, max_pixels=opts.max_pixels, min_size=opts.min_size)).take_all()
    return sorted(rows, key=lambda r: r["path"])


def _write_shards(pending: list[dict], source: str, out: str, opts: Options, concurrency: int | None) -> None:
    """Pass 2 on Ray Data: one task per shard plan, with a progress line as each shard completes."""
    t0 = time.perf_counter()
    ds = ray.data.from_items([{"index": p["index"], "plan": json.dumps(p)} for p in pending],
                             override_num_blocks=len(pending))
    counts = Counter()
    for row in ds.map(_write_shard, fn_kwargs=dict(source=source, out=out, opts=asdict(opts)), num_cpus=1,
                      concurrency=concurrency).iter_rows():
        counts.update({k: row[k] for k in ("samples", "images", "rejected", "bytes")})
        counts["shards"] += 1
        dt = time.perf_counter() - t0
        log(f"{row['shard']} done ({row['samples']} samples, {row['bytes'] / 2**20:.1f} MiB); "
            f"{counts['shards']}/{len(pending)} shards, {counts['samples']} samples, "
            f"{counts['samples'] / dt:.1f} samples/s, {counts['images'] / dt:.1f} images/s")


def _finish(out: str, source: str, opts: Options, fingerprint: str, plans: list[dict], rejected: list[dict],
            dataset: dict) -> dict:
    """Assemble the tables from the shard records (a killed run's too) and write them, the manifest last.
    -> the split's entry of dataset.json."""
    split = opts.split
    manifest_rows, shard_bytes = [], {}
    for p in plans:
        record = json.loads(storage.read_bytes(_record_uri(out, split, p["name"])))
        manifest_rows += record["manifest"]
        rejected = rejected + record["rejected"]
        shard_bytes[p["name"]] = record["bytes"]
    by_source = {r["source"]: r["reason"] for r in rejected}  # an image cut across two shards is rejected twice
    rejected_rows = [{"split": split, "source": s, "reason": by_source[s]} for s in sorted(by_source)]

    manifest = _merge(_read_table(storage.join(out, "manifest.parquet"), MANIFEST_SCHEMA), split, manifest_rows,
                      MANIFEST_SCHEMA)
    rejected_table = _merge(_read_table(storage.join(out, "rejected.parquet"), REJECTED_SCHEMA), split,
                            rejected_rows, REJECTED_SCHEMA)
    leaks = find_leaks(manifest)
    notes = Counter(n for r in manifest_rows if r["notes"] for n in r["notes"].split("; "))
    entry = {
        "fingerprint": fingerprint,
        "source": source,
        "options": asdict(opts),
        "images": len({r["source"] for r in manifest_rows}),
        "samples": len(manifest_rows),
        "rejected": len(rejected_rows),
        "rejected_reasons": dict(sorted(Counter(r["reason"].split(":")[0] for r in rejected_rows).items())),
        "duplicates": len(manifest_rows) - len({r["sha256"] for r in manifest_rows}),
        "notes": dict(sorted(notes.items())),
        "shards": [{"name": name, "bytes": size} for name, size in shard_bytes.items()],
    }
    dataset = {"format": "pfsr-webdataset", "version": FORMAT_VERSION, "pfsr_version": pfsr.__version__,
               "splits": dict(sorted({**dataset.get("splits", {}), split: entry}.items())),
               "leaks": {"count": len(leaks), "examples": leaks[:20]}}
    _write_table(storage.join(out, "rejected.parquet"), rejected_table)
    storage.write_bytes(storage.join(out, "dataset.json"), json.dumps(dataset, indent=1, sort_keys=True).encode())
    _write_table(storage.join(out, "manifest.parquet"), manifest)
    storage.delete_dir(storage.join(out, PROGRESS, split))
    if not storage.list_files(storage.join(out, PROGRESS)):
        storage.delete_dir(storage.join(out, PROGRESS))

    size = sum(shard_bytes.values())
    log(f"split {split!r}: {entry['images']} images -> {entry['samples']} samples in {len(plans)} shards "
        f"({size / 2**20:.1f} MiB, {size / len(plans) / 2**20:.1f} MiB each) at {out}; {entry['rejected']} rejected "
        "(rejected.parquet)" + (f"; notes: {entry['notes']}" if entry["notes"] else ""))
    for r in rejected_rows[:10]:
        log(f"  rejected {r['source']}: {r['reason']}")
    if entry["duplicates"]:
        log(f"{entry['duplicates']} samples repeat the HR bytes of another sample of the same split")
    if leaks:
        log(f"WARNING: {len(leaks)} HR samples occur in more than one split (validation leaks into training); "
            f"first: {leaks[0]['keys']} - see dataset.json 'leaks'")
    return entry


def prep(source: str, out: str, *, layout: str = "auto", split: str = "train", patch: int = 480, step: int = 240,
         min_size: int = 64, max_pixels: int = images.DEFAULT_MAX_PIXELS, shard_size_mb: float = 256,
         min_shards: int = 8, fmt: str = "png", concurrency: int | None = None,
         ray_address: str | None = None, masks_source: str = "none", masks_from: str | None = None) -> dict:
    """Shard `source` into `out` (see the module docstring); returns the split's entry of dataset.json."""
    t0 = time.perf_counter()
    if patch < 0 or (patch and step <= 0):
        raise InputError(f"--patch {patch} --step {step}: need patch >= 0 (0 keeps images whole) and step > 0")
    if min_shards < 1 or shard_size_mb <= 0:
        raise InputError("--min-shards must be >= 1 and --shard-size-mb positive")
    masks_source, masks_from = _check_masks(masks_source, masks_from)
    layout, files, listing_rejected = _list_source(source, layout, split)
    opts = Options(layout=layout, split=split, patch=patch, step=step, min_size=min_size, max_pixels=max_pixels,
                   shard_size_mb=float(shard_size_mb), min_shards=min_shards, format=fmt, masks=masks_source,
                   masks_from=masks_from)
    fingerprint = _fingerprint(opts, files)

    progress = storage.join(out, PROGRESS, split)
    unfinished = _read_json(storage.join(progress, "plan.json"))
    dataset = _read_json(storage.join(out, "dataset.json")) or {}
    done_before = dataset.get("splits", {}).get(split)
    if unfinished is None and done_before is not None:
        if done_before.get("fingerprint") == fingerprint:
            log(f"split {split!r} in {out} is already complete with these sources and options: nothing to do")
            return done_before
        raise InputError(f"{out} already holds split {split!r} made from other sources or options; "
                         "choose another --out (existing shards are never overwritten)")
    if unfinished is not None and unfinished["fingerprint"] != fingerprint:
        raise InputError(f"{out} holds an unfinished run of split {split!r} with other sources or options; rerun it "
                         f"with the same ones, or delete {progress} and its shards")

    _init_ray(ray_address)
    scanned = _scan(files, source, opts, concurrency)
    plans, rejected = make_plan(scanned, opts)
    n_samples = sum(len(it["crops"]) for p in plans for it in p["items"])
    log(f"scanned {len(files)} files in {time.perf_counter() - t0:.1f} s: {len(files) - len(rejected)} images -> "
        f"{n_samples} samples in {len(plans)} shards; {len(rejected)} rejected from their header")
    if not plans:
        raise InputError(f"source {source}: none of the {len(files)} files of split {split!r} is a usable image "
                         f"(first reason: {rejected[0]['source']}: {rejected[0]['reason']})")

    plan_hash = hashlib.sha256(json.dumps(plans, sort_keys=True).encode()).hexdigest()
    if unfinished is not None and unfinished.get("plan") != plan_hash:
        raise InputError(f"{out}: the unfinished run planned other shards; delete {progress} and its shards")
    storage.write_bytes(storage.join(progress, "plan.json"),
                        json.dumps({"fingerprint": fingerprint, "plan": plan_hash}).encode())
    storage.clean_temp_files(out)
    done = {e.path[:-len(".json")] for e in storage.list_files(progress) if e.path.endswith(".tar.json")}
    if done:
        log(f"resuming: {len(done)} of {len(plans)} shards already complete")
    pending = [p for p in plans if p["name"] not in done]
    if pending:
        _write_shards(pending, source, out, opts, concurrency)
    entry = _finish(out, source, opts, fingerprint, plans, listing_rejected + rejected, dataset)
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return entry


def _check_masks(masks_source: str, masks_from: str | None) -> tuple[str, str | None]:
    """--masks / --masks-from -> (mask source of Options, absolute masks folder)."""
    if masks_from:
        if masks_source not in ("none", "file"):
            raise InputError(f"--masks {masks_source} and --masks-from: choose one source of masks")
        if not storage.exists(masks_from):
            raise InputError(f"--masks-from {masks_from} does not exist")
        return "file", masks_from if storage.is_s3(masks_from) else storage.resolve(masks_from)[1]
    if masks_source not in ("none", *masks.SEGMENTERS):
        raise InputError(f"--masks {masks_source}: choose none, {', '.join(masks.SEGMENTERS)} (or --masks-from DIR)")
    return masks_source, None


def run_cli(args: argparse.Namespace) -> int:
    prep(args.source, args.out, layout=args.layout, split=args.split, patch=args.patch, step=args.step,
         min_size=args.min_size, max_pixels=args.max_pixels, shard_size_mb=args.shard_size_mb,
         min_shards=args.min_shards, fmt=args.format, concurrency=args.concurrency, ray_address=args.ray_address,
         masks_source=args.masks, masks_from=args.masks_from)
    return 0

