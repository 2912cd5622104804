"""Training datasets in the artifact store: inline uploads and ImageFolder archives, validated on the way in.

Layout: ``datasets/<dataset_id>/manifest.json`` (classes, counts, files) and the image files under
``datasets/<dataset_id>/<class index>/<n>.<ext>``. The id is a content hash, so uploading the same data twice
gives the same dataset (and the same feature cache). Archive entries with absolute paths, ``..``, links or
devices are refused, and so is every image that does not decode within the limits.

Archives are read member by member with :class:`ArchiveLimits` enforced *while streaming*: the member count and
each member's declared size are checked before it is inflated, and the bytes actually inflated are counted in
1 MiB chunks, so a bomb (a tiny zip holding a 1.5 GB member) is refused with 413 after at most one member limit of
memory. A dataset is published by renaming a uniquely named temporary folder, so identical uploads racing in two
pods never touch each other's files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import torch
from PIL import Image

from service.errors import InvalidRequest, NotFound, PayloadTooLarge, UnsupportedMedia, disk_full
from service.images import decode_image, probe
from service.validation import clean_text

__all__ = ["ArchiveLimits", "Dataset", "DatasetStore", "decoded_chunks", "spread"]

_ID = re.compile(r"^ds-[0-9a-f]{20}$")
_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}


@dataclass(frozen=True)
class ArchiveLimits:
    total_bytes: int  # decompressed bytes of all members
    member_bytes: int  # decompressed bytes of one member
    members: int  # number of file members


class _Budget:
    """Counts members and inflated bytes of one archive; 413 as soon as a limit is passed."""

    _CHUNK = 1 << 20

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.members = 0
        self.total = 0

    def admit(self, name: str, declared: int) -> None:
        """Before inflating a member: its number and its declared size."""
        self.members += 1
        if self.members > self.limits.members:
            raise PayloadTooLarge(f"the archive has more than {self.limits.members} members")
        if declared > self.limits.member_bytes:
            raise PayloadTooLarge(f"archive entry {name!r} inflates to {declared} bytes; the limit per member is "
                                  f"{self.limits.member_bytes}")
        if self.total + declared > self.limits.total_bytes:
            raise PayloadTooLarge(f"the archive inflates to more than {self.limits.total_bytes} bytes")

    def read(self, f: IO[bytes], name: str) -> bytes:
        """Inflate one member in chunks, counting the bytes really produced (declared sizes can lie)."""
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = f.read(self._CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > self.limits.member_bytes:
                raise PayloadTooLarge(f"archive entry {name!r} inflates to more than {self.limits.member_bytes} "
                                      "bytes (the limit per member)")
            if self.total + size > self.limits.total_bytes:
                raise PayloadTooLarge(f"the archive inflates to more than {self.limits.total_bytes} bytes")
            parts.append(chunk)
        self.total += size
        return b"".join(parts)


_NO_LIMITS = ArchiveLimits(1 << 62, 1 << 62, 1 << 62)


@dataclass
class Dataset:
    dataset_id: str
    classes: list[str]
    files: list[tuple[str, int]]  # (path relative to the dataset folder, class index)

    @property
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(self.classes, 0)
        for _, c in self.files:
            out[self.classes[c]] += 1
        return out


class DatasetStore:
    def __init__(self, root: Path, max_pixels: int, max_images: int, limits: ArchiveLimits = _NO_LIMITS,
                 max_class_chars: int = 300) -> None:
        """``root``: the artifact store's datasets folder; class names are checked like label-set classes."""
        self.root = root
        self.max_pixels = max_pixels
        self.max_images = max_images
        self.limits = limits
        self.max_class_chars = max_class_chars

    def sweep(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary dataset folders left by a crash or a full disk (older than ``older_than_s``: another
        pod may be writing a younger one right now). Returns how many were removed."""
        if not self.root.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - older_than_s
        for tmp in self.root.glob(".ds-*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _write(self, samples: list[tuple[str, bytes]]) -> Dataset:
        """samples: (class name, image bytes), already validated."""
        if not samples:
            raise InvalidRequest("the dataset holds no images")
        if len(samples) > self.max_images:
            raise PayloadTooLarge(f"{len(samples)} images; a dataset holds at most {self.max_images}")
        classes = sorted({c for c, _ in samples})
        if len(classes) < 2:
            raise InvalidRequest(f"the dataset has a single class ({classes[0]!r}); fitting needs at least two")
        dataset_id = self.id_of(samples)
        folder = self.root / dataset_id
        if (folder / "manifest.json").is_file():
            return self.get(dataset_id)
        tmp = self.root / f".{dataset_id}.{uuid.uuid4().hex}.tmp"
        index = {c: i for i, c in enumerate(classes)}
        try:
            files = []
            for n, (c, blob) in enumerate(samples):
                idx = index[c]
                fmt = probe(blob, self.max_pixels, n).format.upper()
                rel = f"{idx}/{n}.{_EXT.get(fmt, 'png')}"
                (tmp / str(idx)).mkdir(parents=True, exist_ok=True)
                _write_synced(tmp / rel, blob)
                files.append((rel, idx))
            _write_synced(tmp / "manifest.json", json.dumps({"classes": classes, "files": files}).encode())
        except BaseException as exc:  # a full disk (507), a cancelled request: leave nothing behind
            shutil.rmtree(tmp, ignore_errors=True)
            full = disk_full(exc)
            if full is not None:
                raise full from exc
            raise
        try:
            tmp.rename(folder)  # atomic publish; a concurrent identical upload may have won
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.get(dataset_id)

    @staticmethod
    def id_of(samples: list[tuple[str, bytes]]) -> str:
        """The content hash of (class, image bytes) pairs, whatever their order: ``ds-<20 hex>``."""
        h = hashlib.sha256()
        for c, blob in sorted(samples, key=lambda s: (s[0], hashlib.sha256(s[1]).digest())):
            h.update(c.encode() + b"\0" + hashlib.sha256(blob).digest())
        return "ds-" + h.hexdigest()[:20]

    def exists(self, dataset_id: str) -> bool:
        return bool(_ID.fullmatch(dataset_id)) and (self.root / dataset_id / "manifest.json").is_file()

    def remove(self, dataset_id: str) -> None:
        """Delete a stored dataset (a request that stored it and was then refused leaves nothing)."""
        if _ID.fullmatch(dataset_id):
            shutil.rmtree(self.root / dataset_id, ignore_errors=True)

    def check_inline(self, images: list[bytes], labels: list[str]) -> None:
        """Validate an inline dataset without storing it: counts, labels (like label-set classes), every image
        decodable within the limits (422/413/415)."""
        if len(images) != len(labels):
            raise InvalidRequest(f"dataset has {len(images)} images but {len(labels)} labels")
        if len(images) > self.max_images:
            raise PayloadTooLarge(f"{len(images)} images; a dataset holds at most {self.max_images}")
        for i, label in enumerate(labels):
            clean_text(label, f"dataset.labels[{i}]", self.max_class_chars)
        for i, blob in enumerate(images):
            decode_image(blob, self.max_pixels, i).close()
        if len(set(labels)) < 2:
            raise InvalidRequest(f"the dataset has a single class ({labels[0]!r}); fitting needs at least two")

    def from_inline(self, images: list[bytes], labels: list[str]) -> Dataset:
        self.check_inline(images, labels)
        return self._write(list(zip(labels, images, strict=True)))

    def from_archive(self, data: bytes) -> Dataset:
        """A tar (optionally gzip/bz2/xz) or zip archive in ImageFolder layout: <class>/<image>."""
        try:
            samples, names = self._read_members(data)
        except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise InvalidRequest(f"the archive is corrupt: {exc}") from exc
        for i, (_, blob) in enumerate(samples):
            try:
                decode_image(blob, self.max_pixels, i).close()
            except (UnsupportedMedia, PayloadTooLarge) as exc:
                raise InvalidRequest(f"archive entry {names[i]!r}: {exc.message}") from exc
        return self._write(samples)

    def _read_members(self, data: bytes) -> tuple[list[tuple[str, bytes]], list[str]]:
        """(class, bytes) of every file member and its name, within the archive limits."""
        samples: list[tuple[str, bytes]] = []
        names: list[str] = []
        budget = _Budget(self.limits)
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    mode = (info.external_attr >> 16) & 0o170000
                    if mode and mode != 0o100000:
                        raise InvalidRequest(f"archive entry {info.filename!r} is not a regular file")
                    cls = self._class_of(info.filename)
                    budget.admit(info.filename, info.file_size)
                    with zf.open(info) as f:
                        samples.append((cls, budget.read(f, info.filename)))
                    names.append(info.filename)
        else:
            try:
                tf = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")  # noqa: SIM115 - closed by `with tf` below
            except tarfile.TarError as exc:
                raise UnsupportedMedia("the upload is neither a tar nor a zip archive") from exc
            with tf:
                for member in tf:  # streaming: members are read one by one, never all headers first
                    if member.isdir():
                        continue
                    if not member.isfile():
                        raise InvalidRequest(f"archive entry {member.name!r} is a link or device; only files allowed")
                    cls = self._class_of(member.name)
                    budget.admit(member.name, member.size)
                    f = tf.extractfile(member)
                    assert f is not None
                    samples.append((cls, budget.read(f, member.name)))
                    names.append(member.name)
        return samples, names

    def _class_of(self, name: str) -> str:
        shown = ascii(name[:120])
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or name.startswith("/"):
            raise InvalidRequest(f"archive entry {shown} has an absolute path or '..'")
        parts = [p for p in path.parts if p not in ("", ".")]
        if len(parts) != 2:
            raise InvalidRequest(f"archive entry {shown} is not <class>/<image> (ImageFolder layout)")
        return clean_text(parts[0], f"the class folder of archive entry {shown}", self.max_class_chars)

    def get(self, dataset_id: str) -> Dataset:
        if not _ID.fullmatch(dataset_id):
            raise InvalidRequest(f"dataset id {dataset_id[:64]!r} is not 'ds-' followed by 20 hex digits (from POST "
                                 "/datasets); a world task is named 'world:<task>'")
        manifest = self.root / dataset_id / "manifest.json"
        if not manifest.is_file():
            raise NotFound(f"unknown dataset {dataset_id}")
        data = json.loads(manifest.read_text())
        return Dataset(dataset_id, list(data["classes"]), [(str(f), int(c)) for f, c in data["files"]])

    def path(self, dataset_id: str) -> Path:
        return self.root / dataset_id


def spread(n_files: int, n: int) -> list[int]:
    """Up to ``n`` file indices spread evenly over ``n_files`` (manifests are in class order: every class shows)."""
    return np.unique(np.linspace(0, n_files - 1, min(n, n_files)).round().astype(int)).tolist()


def decoded_chunks(preprocess: Callable[[Image.Image], torch.Tensor], folder: Path, files: list[str],
                   chunk: int = 256) -> Iterator[torch.Tensor]:
    """Stored files (paths relative to ``folder``; validated at upload) -> preprocessed (<= chunk, 3, S, S) pixel
    batches, so a caller holds one chunk of pixels whatever the dataset's size."""
    for i in range(0, len(files), chunk):
        pixels = []
        for rel in files[i : i + chunk]:
            with Image.open(folder / rel) as im:
                im.seek(0)
                pixels.append(preprocess(im.convert("RGB")))
        yield torch.stack(pixels)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
