"""Decode, validate and cut images (no Ray): shared by `pfsr prep`, `pfsr upscale` and the Serve endpoint.

Every image becomes [H x W x 3] uint8 sRGB, oriented as its EXIF tag says; what had to be converted is written
into `notes` (one short phrase each). What cannot be used raises `ImageRejected` (an InputError) whose `reason`
is one line. The pixel count is checked from the header, before any pixel is decoded (decompression bombs).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from .errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm", ".gif")
DEFAULT_MAX_PIXELS = 64_000_000
ENCODINGS = ("png", "webp")

# EXIF orientation -> the transpose that shows the image upright (as PIL.ImageOps.exif_transpose).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
_EXIF_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


class ImageRejected(InputError):
    """An image that cannot be used; `reason` is one line without the file name."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass
class ImageHeader:
    """What the header says, sizes after EXIF orientation."""

    width: int
    height: int
    mode: str
    format: str
    orientation: int = 1


@dataclass
class DecodedImage:
    """rgb: [H x W x 3] uint8 sRGB; alpha: [H x W] uint8 or None; notes: conversions applied."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    format: str = ""


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _open(data: bytes, name: str, max_pixels: Optional[int], min_size: int) -> tuple[Image.Image, ImageHeader]:
    if not data:
        raise ImageRejected(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's global warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageRejected(name, f"too many pixels: {_one_line(e)}") from None
    except UnidentifiedImageError:
        raise ImageRejected(name, f"not an image: no known format starts with {data[:8]!r}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejected(name, f"unreadable image header: {_one_line(e)}") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageRejected(name, f"too many pixels: {w}x{h} = {w * h} is more than the maximum {max_pixels} "
                                  "(decompression-bomb guard; raise --max-pixels to accept it)")
    orientation = _orientation(img)
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if min(w, h) < min_size:
        raise ImageRejected(name, f"too small: {w}x{h}, the shorter side must be at least {min_size} (--min-size)")
    return img, ImageHeader(width=w, height=h, mode=img.mode, format=img.format or "", orientation=orientation)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation from the header only (PNG's getexif() would decode the whole image to look for it)."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = int(exif.get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block is not a broken image: ignore the tag
        return 1
    return value if value in _ORIENTATION else 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_header(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1) -> ImageHeader:
    """Size, mode and format from the header alone; raises ImageRejected (empty, not an image, too many pixels,
    too small). Enough bytes for the header suffice (a file's first 256 KiB, say)."""
    return _open(data, name, max_pixels, min_size)[1]


def decode_image(data: bytes, name: str, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, *, min_size: int = 1) -> DecodedImage:
    """Encoded bytes -> DecodedImage (8-bit sRGB, EXIF orientation applied); raises ImageRejected. max_pixels
    None: no limit (files the caller chose, e.g. `pfsr upscale`).

    Converted with a note: ICC profiles other than sRGB (to sRGB), CMYK, 16-bit, palette, grayscale, alpha
    (split off into `alpha`), multi-frame files (first frame).
    """
    img, header = _open(data, name, max_pixels, min_size)
    notes: list[str] = []
    n_frames = getattr(img, "n_frames", 1)
    if n_frames > 1:
        notes.append(f"first of {n_frames} frames")
    rawmode = _rawmode(img)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejected(name, f"corrupt or truncated {header.format or 'image'}: {_one_line(e)}") from None

    mode = img.mode
    if mode == "F":
        raise ImageRejected(name, "32-bit floating-point pixels have no defined 8-bit range")
    if mode in _SIXTEEN_BIT_GRAY:
        # 16-bit (or 32-bit integer) grayscale: round to 8 bits; values beyond 16 bits are clipped.
        gray = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8), "L")
        notes.append("16-bit grayscale converted to 8-bit")
    elif ";16" in rawmode:
        notes.append("16 bits per channel reduced to 8")
    if img.mode in ("P", "PA"):
        has_alpha = img.mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        notes.append("palette converted to RGB")

    alpha = None
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        alpha = np.asarray(img.getchannel("A")).copy()
        img = img.convert(img.mode[0] if img.mode[0] == "L" else "RGB")
        notes.append("alpha channel split off")

    img = _to_srgb(img, notes)
    if img.mode in ("1", "L"):
        notes.append("grayscale converted to RGB")
    elif img.mode != "RGB":
        notes.append(f"{img.mode} converted to RGB")
    img = img.convert("RGB")

    if header.orientation != 1:
        img = img.transpose(_ORIENTATION[header.orientation])
        if alpha is not None:
            alpha = np.asarray(Image.fromarray(alpha).transpose(_ORIENTATION[header.orientation])).copy()
        notes.append(f"EXIF orientation {header.orientation} applied")
    rgb = np.asarray(img, dtype=np.uint8).copy()
    return DecodedImage(rgb=rgb, alpha=alpha, notes=notes, format=header.format)


def _rawmode(img: Image.Image) -> str:
    """The decoder's raw mode ('RGB;16B' for a 16-bit RGB PNG that Pillow hands over as 8-bit 'RGB')."""
    tile = getattr(img, "tile", None) or []
    if not tile:
        return ""
    args = tile[0].args if hasattr(tile[0], "args") else tile[0][3]
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def _to_srgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Apply an embedded ICC profile (other than sRGB) so that the pixels are sRGB."""
    icc = img.info.get("icc_profile")
    if not icc:
        return img
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = ImageCms.getProfileDescription(profile).strip()
    except (ImageCms.PyCMSError, OSError, TypeError) as e:
        notes.append(f"unreadable ICC profile ignored ({_one_line(e)})")
        return img
    if description.lower().startswith("srgb"):
        return img
    try:
        out = ImageCms.profileToProfile(img, profile, _SRGB, outputMode="RGB")
    except ImageCms.PyCMSError as e:
        notes.append(f"ICC profile '{description}' ignored ({_one_line(e)})")
        return img
    notes.append(f"{img.mode} with ICC profile '{description}' converted to sRGB")
    return out


def subimage_boxes(width: int, height: int, patch: int, step: int) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom) of BasicSR's extract_subimages: patch x patch windows every `step`
    pixels, plus one flush with the right/bottom border (thresh_size 0). A side shorter than the patch is kept
    whole; patch 0 keeps the whole image. Row-major order."""
    if patch <= 0:
        return [(0, 0, width, height)]
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")

    def starts(size: int) -> list[int]:
        if size <= patch:
            return [0]
        s = list(range(0, size - patch + 1, step))
        if s[-1] + patch < size:
            s.append(size - patch)
        return s

    pw, ph = min(patch, width), min(patch, height)
    return [(x, y, x + pw, y + ph) for y in starts(height) for x in starts(width)]


def crop(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """[H x W x C] -> the box (left, top, right, bottom), contiguous."""
    left, top, right, bottom = box
    return np.ascontiguousarray(rgb[top:bottom, left:right])


def encode_image(rgb: np.ndarray, fmt: str = "png") -> bytes:
    """Lossless, deterministic encoding of [H x W x 3] uint8 (no timestamps or metadata in the file).

    PNG at zlib level 1: 4x faster than the default level 6 for about 10% more bytes on photos.
    """
    buf = io.BytesIO()
    img = Image.fromarray(rgb, "RGB")
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    elif fmt == "webp":
        img.save(buf, format="WEBP", lossless=True, quality=50, method=1, exact=True)
    else:
        raise ValueError(f"unknown encoding {fmt!r}; choose one of {ENCODINGS}")
    return buf.getvalue()


def load_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded sample bytes (a shard's png/webp member) -> [H x W x 3] uint8, without the checks of
    `decode_image` (the shards hold RGB that `pfsr prep` validated)."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8)
