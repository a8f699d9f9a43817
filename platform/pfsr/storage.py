"""Local paths and s3:// URIs behind one small API (no Ray): resolve to a pyarrow FileSystem, list, read,
write atomically.

S3-compatible stores are reached through the standard AWS settings: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3),
AWS_REGION / AWS_DEFAULT_REGION and the usual credentials chain. pyarrow's S3FileSystem does not read
AWS_ENDPOINT_URL by itself, so `resolve` passes it explicitly; hand the same filesystem to Ray
(`storage_filesystem=`, `ray.data.read_*(filesystem=)`) so a restore never rebuilds a bare one that lost the endpoint.

Atomic writes: a local file appears under its final name only complete (temp file in the same folder + rename);
an S3 object only when its single PUT or its multipart upload completes (boto3 aborts the upload on failure,
which pyarrow's output stream does not: closing it after an error would publish the partial object).
"""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

from .errors import InputError

S3_PREFIX = "s3://"
# Attempts per S3 request (pyarrow and boto3 alike): throttling (503 SlowDown), 500s, resets and timeouts are
# retried with AWS's standard backoff.
S3_MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class FileEntry:
    """A file below a listed prefix: `path` relative to it with '/' separators, `size` in bytes."""

    path: str
    size: int


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, access_key: str | None) -> pafs.S3FileSystem:
    # access_key is only part of the cache key: pyarrow reads the credentials chain itself.
    kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3FileSystem of the current AWS settings (explicit endpoint; see the module docstring)."""
    return _s3_filesystem(_endpoint(), _region(), os.environ.get("AWS_ACCESS_KEY_ID"))


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """Local path, file:// or s3://bucket/key -> (pyarrow FileSystem, path within it)."""
    uri = str(uri)
    if is_s3(uri):
        path = uri[len(S3_PREFIX):].rstrip("/")
        if not path:
            raise InputError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
        return s3_filesystem(), path
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str | Path, *parts: str) -> str:
    """Append '/'-separated parts to a local path or URI."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _file_info(uri: str | Path, fs: pafs.FileSystem, what):
    """fs.get_file_info, with an S3 failure (endpoint down, wrong credentials) as an InputError that says where."""
    try:
        return fs.get_file_info(what)
    except OSError as e:
        if not is_s3(uri):
            raise
        raise InputError(f"{uri}: the S3 request failed at endpoint {_endpoint() or 'the AWS default'} "
                         f"({' '.join(str(e).split())}); check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), that the "
                         "endpoint is up and reachable from here, and the AWS credentials") from None


def exists(uri: str | Path) -> bool:
    fs, path = resolve(uri)
    return _file_info(uri, fs, path).type != pafs.FileType.NotFound


def is_file(uri: str | Path) -> bool:
    fs, path = resolve(uri)
    return _file_info(uri, fs, path).type == pafs.FileType.File


def list_files(uri: str | Path, *, recursive: bool = True) -> list[FileEntry]:
    """Files below a folder or prefix, sorted by relative path; [] when it does not exist."""
    fs, root = resolve(uri)
    if _file_info(uri, fs, root).type != pafs.FileType.Directory:
        return []
    infos = _file_info(uri, fs, pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    prefix = root.rstrip("/") + "/"
    entries = [FileEntry(info.path[len(prefix):], info.size) for info in infos
               if info.type == pafs.FileType.File and info.path.startswith(prefix)]
    return sorted(entries, key=lambda e: e.path)


def read_bytes(uri: str | Path, *, max_bytes: int | None = None) -> bytes:
    """The file's bytes, or only its first `max_bytes` (one ranged GET on S3)."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            return f.read(max_bytes) if max_bytes is not None else f.readall()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} does not exist") from None


def open_input_stream(uri: str | Path, buffer_size: int = 1 << 20):
    """A buffered sequential reader (tar streaming)."""
    fs, path = resolve(uri)
    return fs.open_input_stream(path, buffer_size=buffer_size)


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Write `data` so that the file appears under its final name only complete (see the module docstring)."""
    if is_s3(uri):
        _s3_put(str(uri), data)
        return
    _, path = resolve(uri)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _s3_put(uri: str, data: bytes) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    bucket, _, key = uri[len(S3_PREFIX):].partition("/")
    client = boto3.client("s3", endpoint_url=_endpoint(), region_name=_region(),
                          config=Config(retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}))
    # Below the threshold one PUT; above it a multipart upload that boto3 completes, or aborts on error.
    client.upload_fileobj(io.BytesIO(data), bucket, key, Config=TransferConfig(multipart_threshold=64 << 20,
                                                                               multipart_chunksize=64 << 20))


def delete(uri: str | Path) -> None:
    """Delete a file if it exists."""
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_dir(uri: str | Path) -> None:
    """Delete a folder or prefix and everything below it, if it exists."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def clean_temp_files(uri: str | Path) -> int:
    """Remove the temp files that a killed local `write_bytes` left in a folder; returns how many."""
    if is_s3(uri):
        return 0  # an unfinished S3 upload never becomes visible
    _, folder = resolve(uri)
    if not os.path.isdir(folder):
        return 0
    stale = [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp")]
    for name in stale:
        os.unlink(os.path.join(folder, name))
    return len(stale)
