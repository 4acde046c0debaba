"""The results store: a Zarr v3 group on a (shared) file system, and its commit markers.

Layout of ``STORE/`` (every array's first axis is the record, in the order of ``files``)::

    zarr.json          group; attributes["gradcam_jax"] = the run's configuration, "complete",
                       and when complete a "summary" (counts only: no times, no host names)
    files     (N,)                 string   record names (paths relative to the folder)
    maps      (N, [M,] [K,] h, w)  float16  M methods (when a list was given), K targets
    targets   (N, [K])             int32    the classes explained (-1: skipped / callable target)
    classes   (N, top)             int32    the most probable classes, best first (-1: skipped)
    probs     (N, top)             float32  their softmax probabilities (NaN: skipped)
    errors    (N,)                 string   "" for a record that was explained, else why not
    .progress/                     commit markers, one per (global batch, process block);
                                   removed when the run completes

Every per-record array is chunked by ``rows`` records along the first axis — the rows one
process contributes to one global batch — so each chunk has exactly one writer and is written
whole, never read-modified-written. A batch is committed by writing its marker (write to a
temporary name, then ``os.replace``: atomic) *after* all its chunks were written (Zarr writes
each chunk to a temporary file and renames it, too). A run killed at any moment leaves
committed batches complete; anything uncommitted is recomputed and its chunks overwritten with
identical bytes on resume. Stray temporary files of a killed run are removed when resuming.

The store is readable by any Zarr v3 reader (``zarr.open_group``); numeric arrays also by
TensorStore's ``zarr3`` driver. Strings use Zarr's ``string`` data type (``vlen-utf8``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT",
    "ARRAYS",
    "Results",
    "open_results",
    "require",
    "create_store",
    "delete_store",
    "read_config",
    "read_names",
    "config_mismatch",
    "write_marker",
    "read_markers",
    "finalize",
    "clean_partials",
    "drop_progress",
    "open_arrays",
    "digest_arrays",
    "array_layout",
]

FORMAT = "gradcam_jax.dataset/1"
ATTR = "gradcam_jax"
PROGRESS = ".progress"
ARRAYS = ("maps", "targets", "classes", "probs", "errors")


def require(*modules: str) -> None:
    """Fail with an installation hint when an optional dependency of dataset runs is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"gradcam_jax dataset runs need {', '.join(missing)}: pip install "
            f"'gradcam-jax[dataset]' (grain, zarr>=3, tqdm)."
        )


def _zarr():
    require("zarr")
    import zarr

    return zarr


# --------------------------------------------------------------------------------------------
# Creation
# --------------------------------------------------------------------------------------------


def _creating_prefix(path: Path) -> str:
    return f".{path.name}.creating-"


def _deleting_prefix(path: Path) -> str:
    return f".{path.name}.deleting-"


def remove_stale_creations(path: Path) -> None:
    """Remove half-created or half-deleted stores left by a run killed next to ``path``."""
    parent = path.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if entry.name.startswith((_creating_prefix(path), _deleting_prefix(path))) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def delete_store(path: Path) -> None:
    """Delete a store: first renamed out of the way (atomic), so that a run killed while
    deleting never leaves a half-deleted store at ``path`` that looks resumable."""
    path = Path(path)
    trash = path.parent / f"{_deleting_prefix(path)}{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def array_layout(
    n: int, rows: int, top: int, map_shape: tuple[int, ...], target_shape: tuple[int, ...], method_axis: bool
) -> dict[str, tuple]:
    """The per-record arrays of a store of ``n`` records chunked by ``rows``: ``name -> (shape,
    dtype, chunks, fill_value, dimension_names)``. ``map_shape`` and ``target_shape`` are one
    record's maps (``([M,] [K,] h, w)``) and explained classes (``()`` or ``(K,)``)."""
    target_dims = ["target"] if target_shape else []
    map_dims = ["record"] + (["method"] if method_axis else []) + target_dims
    map_dims += ["y", "x"][: len(map_shape) + 1 - len(map_dims)]
    return {
        "maps": ((n,) + map_shape, "float16", (rows,) + map_shape, np.nan, map_dims),
        "targets": ((n,) + target_shape, "int32", (rows,) + target_shape, -1, ["record"] + target_dims),
        "classes": ((n, top), "int32", (rows, top), -1, ["record", "rank"]),
        "probs": ((n, top), "float32", (rows, top), np.nan, ["record", "rank"]),
        "errors": ((n,), str, (rows,), "", ["record"]),
    }


def create_store(path: Path, config: dict[str, Any], names: list[str], layout: dict[str, Any]) -> None:
    """Create the store atomically: build it in a sibling folder, then rename it to ``path``.

    ``layout`` maps each array name to ``(shape, dtype, chunks, fill_value, dimension_names)``.
    """
    zarr = _zarr()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_creations(path)
    tmp = path.parent / f"{_creating_prefix(path)}{uuid.uuid4().hex[:8]}"
    try:
        group = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        group.attrs[ATTR] = dict(config, complete=False)
        n = len(names)
        files = group.create_array(
            "files",
            shape=(n,),
            dtype=str,
            chunks=(max(1, min(n, 65536)),),
            fill_value="",
            dimension_names=["record"],
        )
        if n:
            files[:] = np.array(names, dtype=object)
        for name, (shape, dtype, chunks, fill, dims) in layout.items():
            group.create_array(
                name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill, dimension_names=dims
            )
        (tmp / PROGRESS).mkdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def digest_arrays(arrays: Iterable[Any]) -> str:
    """A short digest of arrays (their dtypes, shapes and bytes), for the configuration."""
    h = hashlib.sha256()
    for leaf in arrays:
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def read_names(path: Path) -> list[str]:
    """The record names (``files``) a store holds: the job's list of records."""
    group = _zarr().open_group(str(path), mode="r")
    return [str(v) for v in strings(group["files"][:])]


#: Configuration entries that describe a job without defining it (a folder moved, class names
#: relabelled): a store whose other entries match is the same job.
INFO_KEYS = frozenset({"complete", "summary", "root", "class_names"})


def config_mismatch(stored: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The entries (sorted) in which a stored job and a new run's configuration differ."""
    keys = (set(stored) | set(config)) - INFO_KEYS

    def same(k):
        return json.dumps(stored.get(k), sort_keys=True) == json.dumps(config.get(k), sort_keys=True)

    return sorted(k for k in keys if not same(k))


def read_config(path: Path) -> dict[str, Any] | None:
    """The run configuration stored in ``path``, or None when ``path`` is no store of ours."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfg = (doc.get("attributes") or {}).get(ATTR)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        return None
    return cfg


# --------------------------------------------------------------------------------------------
# Commit markers
# --------------------------------------------------------------------------------------------


def _marker_name(step: int, block: int) -> str:
    return f"{step:09d}.{block:05d}.json"


def write_marker(path: Path, step: int, block: int, payload: dict[str, Any]) -> None:
    """Commit ``(step, block)``: write the marker under a temporary name, then rename (atomic)."""
    d = Path(path) / PROGRESS
    final = d / _marker_name(step, block)
    tmp = d / f".tmp-{uuid.uuid4().hex}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, sort_keys=True)
    os.replace(tmp, final)


def read_markers(path: Path, block: int | None = None) -> dict[tuple[int, int], dict[str, Any]]:
    """Committed ``(step, block) -> marker`` (of one block, or all)."""
    d = Path(path) / PROGRESS
    out: dict[tuple[int, int], dict[str, Any]] = {}
    if not d.is_dir():
        return out
    for entry in os.scandir(d):
        name = entry.name
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            step_s, block_s, _ = name.split(".")
            step, blk = int(step_s), int(block_s)
        except ValueError:
            continue
        if block is not None and blk != block:
            continue
        try:
            with open(entry.path, encoding="utf-8") as f:
                out[(step, blk)] = json.load(f)
        except (OSError, ValueError):  # cannot happen with atomic renames; treat as uncommitted
            continue
    return out


def clean_partials(path: Path) -> int:
    """Remove temporary files a killed writer left behind (Zarr's ``*.partial``, our ``.tmp-*``)."""
    removed = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            if name.endswith(".partial") or name.startswith(".tmp-"):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except OSError:
                    pass
    return removed


def finalize(path: Path, summary: dict[str, Any]) -> None:
    """Mark the store complete (one atomic metadata write), then drop the commit markers."""
    zarr = _zarr()
    group = zarr.open_group(str(path), mode="r+")
    cfg = dict(group.attrs[ATTR])
    cfg["complete"] = True
    cfg["summary"] = summary
    group.attrs[ATTR] = cfg
    drop_progress(path)


def drop_progress(path: Path) -> None:
    """Remove the commit markers (all of them)."""
    shutil.rmtree(Path(path) / PROGRESS, ignore_errors=True)


def open_arrays(path: Path) -> dict[str, Any]:
    """The per-record arrays of :data:`ARRAYS`, opened for writing."""
    group = _zarr().open_group(str(path), mode="r+")
    return {name: group[name] for name in ARRAYS}


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def strings(a: Any) -> np.ndarray:
    """A Zarr string array's values as a NumPy object array of ``str`` (any NumPy string dtype)."""
    return np.asarray(a).astype(object)


class Results(Mapping):
    """A results store, read back: a mapping of NumPy-compatible arrays.

    Keys: ``maps``, ``classes``, ``probs``, ``targets``, ``files``, ``errors``. Values are
    ``zarr.Array`` objects: slicing one reads only what is needed and returns a NumPy array
    (``res["maps"][10:20]``), and ``np.asarray(res["probs"])`` reads it whole.

    Attributes:
      path: the store.
      config: the run's configuration (methods, target, layer, sizes...).
      methods: the methods, in the order of the ``maps`` method axis (when there is one).
      complete: whether every record has been processed.
      summary: ``{"images", "explained", "unreadable"}`` once complete.
      class_names: the model's class names, when it had them.
    """

    def __init__(self, path):
        zarr = _zarr()
        self.path = Path(path)
        if read_config(self.path) is None:
            raise FileNotFoundError(
                f"{str(self.path)!r} is not a gradcam_jax results store (no "
                f"zarr.json with gradcam_jax attributes)."
            )
        self.group = zarr.open_group(str(self.path), mode="r")
        self.config: dict[str, Any] = dict(self.group.attrs[ATTR])
        self._keys = tuple(
            k for k in ("maps", "classes", "probs", "targets", "files", "errors") if k in self.group
        )

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(f"{key!r}; the store holds {', '.join(self._keys)}.")
        return self.group[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    @property
    def methods(self) -> list[str]:
        return list(self.config.get("methods", []))

    @property
    def complete(self) -> bool:
        return bool(self.config.get("complete"))

    @property
    def summary(self) -> dict[str, Any] | None:
        return self.config.get("summary")

    @property
    def class_names(self) -> list[str] | None:
        return self.config.get("class_names")

    @property
    def num_records(self) -> int:
        return int(self.config.get("num_records", 0))

    def ok(self) -> np.ndarray:
        """Boolean ``(N,)``: the records that were explained (no error)."""
        return strings(self["errors"][:]) == ""

    def failures(self) -> list[tuple[str, str]]:
        """``[(file, reason), ...]`` for every record that was skipped."""
        errors = strings(self["errors"][:])
        bad = np.flatnonzero(errors != "")
        if not bad.size:
            return []
        files = strings(self["files"][:])
        return [(str(files[i]), str(errors[i])) for i in bad]

    def __repr__(self):
        state = "complete" if self.complete else "incomplete"
        return f"Results({str(self.path)!r}, {self.num_records} records, {state}, keys={list(self._keys)})"


def open_results(path: str | os.PathLike) -> Results:
    """Read a store written by :func:`gradcam_jax.explain_dataset` (or ``gradcam-jax explain-dir``).

    Returns a :class:`Results`: a mapping of NumPy-compatible arrays ``maps``, ``classes``,
    ``probs``, ``targets``, ``files`` and ``errors`` (``""`` for records explained, the reason
    for records skipped), all aligned on the first axis.

    Examples:
      >>> import jax, numpy as np, gradcam_jax as gcj
      >>> tap = gcj.split_tap(lambda x: jax.nn.relu(x), lambda a: a.mean(axis=(1, 2)))
      >>> images = np.random.default_rng(0).random((2, 8, 8, 3), np.float32)
      >>> _ = gcj.explain_dataset(images, tap, out="arrays.zarr", progress=False)
      >>> res = gcj.open_results("arrays.zarr")
      >>> res["maps"].shape, res.failures()
      ((2, 8, 8), [])
    """
    return Results(path)
