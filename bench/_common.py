"""What the benchmarks share: scikit-image's RGB photos, and writing a result (bench/run_all.py skips this file)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")


def load_photos(names: Iterable[str] = PHOTOS) -> list[np.ndarray]:
    """H x W x 3 uint8 RGB photos from skimage.data (stereo_motorcycle: its left view)."""
    from skimage import data

    images = [getattr(data, name)() for name in names]
    return [img[0] if isinstance(img, tuple) else img for img in images]


def save_photos(folder: Path) -> Path:
    """The photos as PNG files in folder/photos; returns that folder."""
    from PIL import Image

    src = folder / "photos"
    src.mkdir()
    for name, img in zip(PHOTOS, load_photos()):
        Image.fromarray(img).save(src / f"{name}.png")
    return src


def write_result(result: dict, path: Path) -> dict:
    """Write the benchmark's one JSON object to path and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result
