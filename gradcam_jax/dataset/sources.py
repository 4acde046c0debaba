"""Dataset sources and the Grain data loader.

A *source* is a fixed, ordered list of records: the image files under a folder (recursive,
sorted by relative path, so every host and every run sees the same order), a list of paths, a
NumPy array ``(N, H, W, C)``, or any sequence (``len`` and ``[]``) of paths, encoded bytes or
arrays. Iterables without ``len`` are read into a list once.

The loader is a Grain pipeline over *global record indices*: for the process holding block
``q`` of every global batch, local position ``k`` is record
``(k // rows) * batch + q * rows + k % rows``. Records are decoded and resized in Grain's
worker threads (or processes); a record that cannot be read becomes a zero image with an error
message, never an exception. The pipeline is a ``MapDataset`` turned into an iterator whose
state (``get_state`` / ``set_state``) is saved with every committed batch, so a resumed run
restarts the iterator exactly where the last commit left it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .images import RecordError, load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "RecordError",
    "list_images",
    "load_image",
    "Source",
    "as_source",
    "RecordSpec",
    "record_spec",
    "BlockRows",
    "LoadRecord",
    "make_loader",
]

#: File name endings read from a folder (case-insensitive).
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
)


def list_images(root: str | os.PathLike, extensions: Sequence[str] | None = None) -> list[str]:
    """Image files under ``root``, recursively, as POSIX paths relative to ``root``, sorted.

    The order is by code point of the relative path: the same on every host and every run.
    Hidden folders (``.git``, ``.progress``...) are not entered. Symbolic links to files are
    listed; links to folders are not followed (no cycles).
    """
    exts = tuple(
        e.lower() if e.startswith(".") else "." + e.lower() for e in (extensions or IMAGE_EXTENSIONS)
    )
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root!r} is not a folder.")
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.lower().endswith(exts) and not name.startswith("."):
                path = name if rel == "." else os.path.join(rel, name)
                out.append(Path(path).as_posix())
    out.sort()
    return out


# --------------------------------------------------------------------------------------------
# Records given as arrays (image files: see .images)
# --------------------------------------------------------------------------------------------


def _array_image(item, size: int | None) -> np.ndarray:
    arr = np.asarray(item)
    if arr.dtype == np.uint8 and arr.ndim in (2, 3):
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        elif arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.shape[-1] == 3 and size is not None and arr.shape[:2] != (size, size):
            from PIL import Image

            arr = np.asarray(
                Image.fromarray(np.ascontiguousarray(arr)).resize((size, size), Image.Resampling.BILINEAR)
            )
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


class Source:
    """An ordered list of records: ``names`` (what the store's ``files`` holds) and ``load(i)``.

    ``kind`` is ``"folder"``, ``"paths"``, ``"array"`` or ``"sequence"``; ``root`` the folder
    for ``"folder"``.
    """

    def __init__(self, kind: str, names: list[str], items=None, root: str | None = None):
        self.kind = kind
        self.names = list(names)
        self.items = items
        self.root = root

    def __len__(self):
        return len(self.names)

    def with_names(self, names: list[str]) -> Source:
        """The same source read through another (the store's) list of names."""
        if self.kind == "folder":
            return Source("folder", names, None, self.root)
        if len(names) != len(self.names):
            raise ValueError(f"the store lists {len(names)} records but the source has {len(self.names)}.")
        if self.kind == "paths":
            return Source("paths", names, None, self.root)
        return self

    def raw(self, i: int):
        if self.kind == "folder":
            return os.path.join(str(self.root), *self.names[i].split("/"))
        if self.kind == "paths":
            return self.names[i]
        return self.items[i]

    def load(self, i: int, size: int | None) -> np.ndarray:
        item = self.raw(i)
        if isinstance(item, dict):
            if "image" not in item:
                raise RecordError(f"a dict record needs an 'image' entry; it has {sorted(item)}")
            item = item["image"]
        if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)):
            return load_image(item, size)
        try:
            return _array_image(item, size)
        except Exception as e:
            raise RecordError(f"cannot convert the record to an array ({type(e).__name__}: {e})") from None

    def digest(self) -> str:
        h = hashlib.sha256()
        for n in self.names:
            h.update(n.encode("utf-8", "surrogateescape"))
            h.update(b"\0")
        return h.hexdigest()[:16]


def as_source(source: Any, extensions: Sequence[str] | None = None) -> Source:
    """Normalise what :func:`explain_dataset` accepts into a :class:`Source`."""
    if isinstance(source, Source):
        return source
    if isinstance(source, (str, os.PathLike)):
        root = os.fspath(source)
        if os.path.isdir(root):
            return Source("folder", list_images(root, extensions), None, os.path.abspath(root))
        if os.path.exists(root):
            return Source("paths", [root])
        raise FileNotFoundError(
            f"{root!r}: no such folder. Pass a folder of images, a list of image "
            f"paths, an array (N, H, W, C) or a sequence of images."
        )
    if isinstance(source, np.ndarray) or (hasattr(source, "shape") and hasattr(source, "__array__")):
        arr = source if isinstance(source, np.ndarray) else np.asarray(source)
        if arr.ndim < 2:
            raise ValueError(
                f"an array source must be (N, H, W, C) (or (N, ...) model inputs); got shape {arr.shape}."
            )
        return Source("array", [f"#{i}" for i in range(arr.shape[0])], arr)
    if isinstance(source, (list, tuple)) and all(isinstance(s, (str, os.PathLike)) for s in source):
        return Source("paths", [os.fspath(s) for s in source])
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return Source("sequence", [f"#{i}" for i in range(len(source))], source)
    if isinstance(source, Iterable):
        items = list(source)
        if all(isinstance(s, (str, os.PathLike)) for s in items) and items:
            return Source("paths", [os.fspath(s) for s in items])
        return Source("sequence", [f"#{i}" for i in range(len(items))], items)
    raise TypeError(
        f"Cannot read a dataset from {type(source).__name__}: pass a folder, a list of image "
        f"paths, an array (N, H, W, C), a sequence (len and []) or an iterable of images."
    )


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """One loaded record: its ``shape`` and ``dtype`` (what padding and unreadable records
    become), and the ``size`` images are resized to (``None``: kept as decoded)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    size: int | None


def record_spec(source: Source, size: int | None) -> RecordSpec:
    """The :class:`RecordSpec` of ``source``'s records (images: ``(size, size, 3)`` ``uint8``;
    other records: as the first readable one loads)."""
    if source.kind in ("folder", "paths"):
        if size is None:
            raise ValueError("reading image files needs a size to resize them to (size=224, say).")
        return RecordSpec((size, size, 3), np.dtype(np.uint8), size)
    last = None
    for i in range(min(len(source), 16)):
        try:
            a = source.load(i, size)
            return RecordSpec(tuple(a.shape), a.dtype, size)
        except RecordError as e:
            last = e
    if size is not None:
        return RecordSpec((size, size, 3), np.dtype(np.uint8), size)
    raise ValueError(f"cannot tell the records' shape: the first ones do not load ({last}).")


# --------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockRows:
    """Local position ``k`` of process block ``block`` -> global record index."""

    batch: int
    rows: int
    block: int

    def __call__(self, k: int) -> int:
        return (k // self.rows) * self.batch + self.block * self.rows + k % self.rows


class LoadRecord:
    """``k -> {"x", "row", "error"[, "target"]}`` for the Grain pipeline (picklable)."""

    def __init__(self, source: Source, record: RecordSpec, rows: BlockRows, targets: np.ndarray | None):
        self.source, self.record, self.rows, self.targets = source, record, rows, targets

    def blank(self):
        return np.zeros(self.record.shape, self.record.dtype)

    def __call__(self, k):
        row = self.rows(int(k))
        error = ""
        if row >= len(self.source):  # padding of the last batch: computed, never written
            x = self.blank()
        else:
            try:
                x = self.source.load(row, self.record.size)
                if tuple(x.shape) != self.record.shape:
                    raise RecordError(
                        f"the record has shape {tuple(x.shape)} but the first records have "
                        f"{self.record.shape}; pass size= to resize images, or give arrays "
                        f"of one shape"
                    )
                if x.dtype != self.record.dtype:
                    x = x.astype(self.record.dtype)
            except RecordError as e:
                x, error = self.blank(), str(e) or "unreadable"
            except Exception as e:  # never let one record stop the run
                x, error = self.blank(), f"{type(e).__name__}: {e}"
        out = {"x": x, "row": np.int64(row), "error": error}
        if self.targets is not None:
            t = (
                self.targets[row]
                if row < len(self.source)
                else np.zeros(self.targets.shape[1:], self.targets.dtype)
            )
            out["target"] = np.asarray(t, np.int32)
        return out


def make_loader(
    load: LoadRecord,
    num_steps: int,
    *,
    workers: int = 4,
    worker_processes: int = 0,
    prefetch: int | None = None,
    first_step: int = 0,
) -> Any:
    """The Grain pipeline for one process: an ``IterDataset`` of local batches of ``rows``.

    Batch ``b`` of the iterator holds global records ``b * batch + block * rows + [0, rows)``
    (``load.rows``), for ``b`` up to ``num_steps``. ``workers`` threads decode ahead
    (``prefetch`` batches); ``worker_processes > 0`` adds Grain's multiprocessing prefetch
    (spawned processes) on top, for hosts with many cores. ``first_step > 0`` starts the
    pipeline at that batch (used when no Grain state was saved).
    """
    import grain

    rows = load.rows.rows
    # Batches are formed on the random-access MapDataset, so a worker (thread or process)
    # produces whole batches and Grain hands them out in order: batch b of the iterator is
    # always local positions [b * rows, (b + 1) * rows).
    ds = (
        grain.MapDataset.range(first_step * rows, num_steps * rows)
        .map(load)
        .batch(rows, drop_remainder=False)
    )
    threads = max(int(workers), 0)
    buffer = prefetch if prefetch is not None else max(2, threads + 1)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer if threads else 0)
    )
    if worker_processes and worker_processes > 0:
        # Grain's multiprocessing reads absl flags; outside an absl app they are unparsed, which
        # it reports as an error. Use the defaults (as absl.app would with no arguments).
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=int(worker_processes), per_worker_buffer_size=2)
        )
    return it
