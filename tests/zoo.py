"""A zoo of awkward image files, made from the scikit-image photos: what `pfsr prep` must reject (with its
reason) and what it must convert (with its note)."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> a phrase of the one-line rejection reason (with --min-size 64 --max-pixels 4_000_000)
REJECTED = {
    "empty.png": "empty file (0 bytes)",
    "truncated.jpg": "corrupt or truncated JPEG",
    "truncated.png": "corrupt or truncated PNG",
    "notes.jpg": "not an image",
    "tiny.png": "too small: 40x30",
    "bomb.png": "too many pixels: Image size (2500000000 pixels)",  # Pillow's own guard
    "big.png": "too many pixels: 3000x3000 = 9000000",  # ours, below Pillow's limit
    "float.tif": "floating-point",
}
# name -> a phrase of a note in the sample's json (all of these are kept)
CONVERTED = {
    "cmyk.jpg": "CMYK converted to RGB",
    "gray16.png": "16-bit grayscale converted to 8-bit",
    "rgb16.tif": "16 bits per channel reduced to 8",
    "palette.png": "palette converted to RGB",
    "rgba.png": "alpha channel split off",
    "gray.png": "grayscale converted to RGB",
    "rotated.jpg": "EXIF orientation 6 applied",
    "linear_icc.png": "converted to sRGB",
    "anim.gif": "first of 2 frames",
}
MIN_SIZE, MAX_PIXELS = 64, 4_000_000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels of RGB over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def linear_rgb_icc() -> bytes:
    """A minimal ICC v2 display profile: sRGB primaries (D50-adapted) with a linear (gamma 1) tone curve, so a
    linear-light value v shows as sRGB(v): 128 -> about 188."""

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x, y, z) -> bytes:
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    text = b"Linear sRGB test\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0" * 3 + b"\0" * 67
    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 0x0100) + b"\0" * 2
    blobs = {b"desc": desc, b"wtpt": xyz(0.9642, 1.0, 0.8249), b"rXYZ": xyz(0.4361, 0.2225, 0.0139),
             b"gXYZ": xyz(0.3851, 0.7169, 0.0971), b"bXYZ": xyz(0.1431, 0.0606, 0.7141), b"rTRC": curve}
    tags = [b"desc", b"wtpt", b"rXYZ", b"gXYZ", b"bXYZ", b"rTRC", b"gTRC", b"bTRC"]
    offset = 128 + 4 + 12 * len(tags)
    table, data, placed = b"", b"", {}
    for tag in tags:
        blob_key = b"rTRC" if tag.endswith(b"TRC") else tag
        if blob_key not in placed:
            blob = blobs[blob_key] + b"\0" * (-len(blobs[blob_key]) % 4)
            placed[blob_key] = (offset + len(data), len(blobs[blob_key]))
            data += blob
        table += tag + struct.pack(">II", *placed[blob_key])
    body = struct.pack(">I", len(tags)) + table + data
    size = 128 + len(body)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntr" + b"RGB " + b"XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249))
    header += b"\0" * (128 - len(header))
    return header + body


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def zoo_files(photo: np.ndarray) -> dict[str, bytes]:
    """name -> bytes of every REJECTED and CONVERTED file, cut from one RGB photo [H x W x 3] uint8."""
    import tifffile

    rgb = Image.fromarray(photo[:96, :128])
    jpeg = _save(rgb, "JPEG", quality=90)
    png = _save(rgb, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show upright
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    rgb16 = io.BytesIO()
    tifffile.imwrite(rgb16, photo[:96, :128].astype(np.uint16) * 257, photometric="rgb")
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    frames = [rgb.convert("P"), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    anim = io.BytesIO()
    frames[0].save(anim, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "empty.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "notes.jpg": b"These are my notes, not a photo.\n" * 20,
        "tiny.png": _save(rgb.resize((40, 30)), "PNG"),
        "bomb.png": bomb_png(50_000, 50_000),
        "big.png": bomb_png(3000, 3000),
        "float.tif": _save(Image.fromarray(np.ones((80, 80), np.float32)), "TIFF"),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG", quality=95),
        "gray16.png": _save(Image.fromarray(gray16), "PNG"),
        "rgb16.tif": rgb16.getvalue(),
        "palette.png": _save(rgb.convert("P"), "PNG"),
        "rgba.png": _save(rgba, "PNG"),
        "gray.png": _save(rgb.convert("L"), "PNG"),
        "rotated.jpg": _save(rgb, "JPEG", quality=95, exif=exif.tobytes()),
        "linear_icc.png": _save(Image.new("RGB", (96, 80), (128, 128, 128)), "PNG", icc_profile=linear_rgb_icc()),
        "anim.gif": anim.getvalue(),
    }


def write_zoo(folder: Path, photo: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in zoo_files(photo).items():
        (folder / name).write_bytes(data)
    return folder
