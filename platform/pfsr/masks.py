"""Segmentation masks of seed 002 (SAM-DiffSR) and their structure encoding E(M). No Ray.

A mask is a label image [H x W] of integers: 0 = no region, 1..n = regions. `pfsr prep --masks` makes one per
whole image with a weight-free segmenter (SEGMENTERS) or imports the user's own (`read_user_mask`: label PNG,
.npy, or SAM's COCO RLE JSON), then cuts it with the sub-images and stores it as the sample's 16-bit PNG member
MASK_MEMBER. The loader crops, flips and rotates it with the HR crop; the training step turns it into E(M)
(`structure_encoding`) on its device.

E(M) as the official SAM-DiffSR code builds it (data_gen/merge_mask_to_one.py, merge_all_mask_to_one_RoPE): a
rotary positional encoding of an all-ones [H x W] array (H positions, W features, theta = 10000), and every region
gets one value, the sum of that encoding over its pixels divided by H W; pixels of no region get 0.
"""
from __future__ import annotations

import io
import json
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import InputError

MASK_MEMBER = "mask.png"  # webdataset member suffix: {key}.mask.png
MASK_FILE_EXTENSIONS = (".png", ".npy", ".json")
ROPE_THETA = 10000.0


class MaskRejected(InputError):
    """A mask that cannot be used for an image; `reason` is one line without the file name."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


# ----------------------------------------------------------------------------------------------------------------
# Weight-free segmenters (scikit-image), on the whole image.

def segment_felzenszwalb(rgb: np.ndarray) -> np.ndarray:
    """Felzenszwalb-Huttenlocher graph segmentation of [H x W x 3] uint8 -> labels [H x W] in 1..n."""
    from skimage.segmentation import felzenszwalb

    return felzenszwalb(rgb, scale=100, sigma=0.8, min_size=50).astype(np.int64) + 1


def segment_slic(rgb: np.ndarray) -> np.ndarray:
    """SLIC superpixels (about 100) of [H x W x 3] uint8 -> labels [H x W] in 1..n."""
    from skimage.segmentation import slic

    return slic(rgb, n_segments=100, compactness=10.0, start_label=1).astype(np.int64)


SEGMENTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "felzenszwalb": segment_felzenszwalb,
    "slic": segment_slic,
}


# ----------------------------------------------------------------------------------------------------------------
# User masks: label PNG, .npy, COCO RLE JSON.

def decode_rle_counts(counts: str | list[int], height: int, width: int) -> np.ndarray:
    """COCO RLE (compressed string as pycocotools' rleToString writes it, or the list of run lengths) ->
    [height x width] bool. Runs alternate 0s and 1s, starting with 0s, over the pixels in column-major order."""
    if isinstance(counts, str):
        runs: list[int] = []
        data, p = counts.encode("ascii"), 0
        while p < len(data):
            x, k, more = 0, 0, True
            while more:
                if p >= len(data):
                    raise ValueError("RLE string ends inside a number")
                c = data[p] - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p, k = p + 1, k + 1
                if not more and c & 0x10:
                    x |= -1 << (5 * k)  # sign extension
            if len(runs) > 2:
                x += runs[-2]  # the fourth count on is stored as the difference to the one two back
            runs.append(x)
    else:
        runs = [int(r) for r in counts]
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels (or are negative), the size says {height}x{width}")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape(width, height).T


def labels_from_annotations(annotations: list[dict]) -> np.ndarray:
    """SAM's automatic masks (each with "segmentation": {"size": [h, w], "counts": ...}) -> labels: mask i gets
    i + 1, a later mask overwrites an earlier one where they overlap (as torch.where in the official merge)."""
    if not annotations:
        raise ValueError("no annotations")
    labels = None
    for i, ann in enumerate(annotations):
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise ValueError(f"annotation {i} has no COCO RLE 'segmentation' {{'size', 'counts'}}")
        h, w = (int(v) for v in seg["size"])
        mask = decode_rle_counts(seg["counts"], h, w)
        if labels is None:
            labels = np.zeros((h, w), np.int64)
        elif labels.shape != mask.shape:
            raise ValueError(f"annotation {i} is {w}x{h}, the first {labels.shape[1]}x{labels.shape[0]}")
        labels[mask] = i + 1
    return labels


def decode_mask_file(data: bytes, name: str) -> np.ndarray:
    """Bytes of a mask file (by its extension: .png label image, .npy 2-D integer array, .json COCO RLE) ->
    labels [H x W] int64 >= 0. Raises MaskRejected."""
    ext = "." + name.rsplit(".", 1)[-1].lower()
    try:
        if ext == ".png":
            img = Image.open(io.BytesIO(data))
            if img.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "P"):
                raise ValueError(f"label PNG must be single-channel (8/16-bit gray or palette), got mode {img.mode}")
            labels = np.asarray(img).astype(np.int64)
        elif ext == ".npy":
            labels = np.load(io.BytesIO(data), allow_pickle=False)
            if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"need a 2-D integer array, got {labels.ndim}-D {labels.dtype}")
            labels = labels.astype(np.int64)
        elif ext == ".json":
            doc = json.loads(data)
            labels = labels_from_annotations(doc["annotations"] if isinstance(doc, dict) else doc)
        else:
            raise ValueError(f"unknown mask format {ext} (use {', '.join(MASK_FILE_EXTENSIONS)})")
    except MaskRejected:
        raise
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise MaskRejected(name, f"unreadable mask: {' '.join(str(e).split())}") from None
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise MaskRejected(name, f"mask labels must lie in [0, 65535], got [{labels.min()}, {labels.max()}]")
    return labels


def check_mask_size(labels: np.ndarray, width: int, height: int, name: str) -> np.ndarray:
    if labels.shape != (height, width):
        raise MaskRejected(name, f"mask size mismatch: mask {labels.shape[1]}x{labels.shape[0]}, image "
                                 f"{width}x{height}")
    return labels


def encode_label_png(labels: np.ndarray) -> bytes:
    """labels [H x W] in [0, 65535] -> 16-bit grayscale PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """A MASK_MEMBER -> labels [H x W] int32."""
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------
# Structure encoding E(M) and its coefficient c(t).

def rope_grid(height: int, width: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Rotary encoding of ones [H x W] (rotary-embedding-torch's rotate_queries_or_keys, H positions, W features):
    for position p and frequency f_i = theta^(-2i/W), features 2i and 2i+1 are cos(p f_i) - sin(p f_i) and
    cos(p f_i) + sin(p f_i); an odd W leaves its last feature at 1."""
    half = width // 2
    freqs = ROPE_THETA ** (-torch.arange(0, 2 * half, 2, dtype=torch.float64, device=device) / width)
    angles = torch.arange(height, dtype=torch.float64, device=device)[:, None] * freqs[None]  # [H x half]
    cos, sin = torch.cos(angles), torch.sin(angles)
    pairs = torch.stack([cos - sin, cos + sin], dim=-1).reshape(height, 2 * half)
    out = torch.ones(height, width, dtype=torch.float64, device=device)
    out[:, :2 * half] = pairs
    return out.to(dtype)


def structure_encoding(labels: Tensor, dtype=torch.float32) -> Tensor:
    """E(M): labels [N x H x W] (0 = no region) -> [N x 1 x H x W], every region of a mask at one value:
    (sum of rope_grid(H, W) over its pixels) / (H W); 0 where the label is 0. Runs on labels' device."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be [N x H x W], got shape {tuple(labels.shape)}")
    n, h, w = labels.shape
    labels = labels.long()
    rope = rope_grid(h, w, device=labels.device, dtype=torch.float64)
    k = int(labels.max().item()) + 1 if labels.numel() else 1
    index = labels + k * torch.arange(n, device=labels.device)[:, None, None]  # one bin per (sample, label)
    sums = torch.zeros(n * k, dtype=torch.float64, device=labels.device)
    sums.index_add_(0, index.reshape(-1), rope.expand(n, h, w).reshape(-1))
    sums = sums.reshape(n, k) / (h * w)
    sums[:, 0] = 0.0
    return sums.gather(1, labels.reshape(n, -1)).reshape(n, 1, h, w).to(dtype)


def structure_coefficient(sde, t: Tensor, scale: float) -> Tensor:
    """c(t) = scale * sigma(t) * beta(t): the continuous counterpart of the official per-step coefficient
    sqrt(1 - abar_k) * beta_k, whose discrete beta_k ~ beta(t_k) / N for N steps (the official config has N = 100:
    scale 0.01)."""
    return scale * sde.sigma(t) * sde.beta(t)


def mask_for_image(rgb: np.ndarray, name: str, *, masks: str, masks_from: Optional[str] = None,
                   read: Optional[Callable[[str], Optional[tuple[str, bytes]]]] = None) -> Optional[np.ndarray]:
    """The label mask of a whole image [H x W x 3]: from the segmenter `masks`, or (masks == "file") the user's file
    that `read(name)` finds (-> (file name, bytes) or None). None when masks == "none". Raises MaskRejected."""
    if masks == "none":
        return None
    h, w = rgb.shape[:2]
    if masks in SEGMENTERS:
        return SEGMENTERS[masks](rgb)
    if masks != "file" or read is None:
        raise ValueError(f"unknown mask source {masks!r}")
    found = read(name)
    if found is None:
        raise MaskRejected(name, f"missing mask: no {name.rsplit('.', 1)[0]}{{{','.join(MASK_FILE_EXTENSIONS)}}} "
                                 f"in {masks_from}")
    file_name, data = found
    return check_mask_size(decode_mask_file(data, file_name), w, h, file_name)
