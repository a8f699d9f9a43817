"""What the benchmarks share: scikit-image's RGB photos, writing a result, and `run`, which keeps stdout for the one
JSON object (bench/run_all.py skips this file)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable

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
    """Write the benchmark's one JSON object to path; returns it (for `run_benchmark` to print)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_benchmark(main: Callable[[], dict]) -> None:
    """A benchmark's entry point: main() runs with stdout sent to stderr, both sys.stdout and file descriptor 1, so
    that its prints, logs, Ray's output and its child processes' (`pfsr prep`'s progress lines, say) go to stderr;
    then the JSON object main() returns is printed on stdout, alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            result = main()
            sys.stderr.flush()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    print(json.dumps(result, indent=2), flush=True)
