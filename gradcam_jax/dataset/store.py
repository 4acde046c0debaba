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

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .lock import NotAStore, OutputNotWritable, store_lock

__all__ = [
    "FORMAT",
    "ARRAYS",
    "require",
    "create_store",
    "folder_state",
    "check_output",
    "claim",
    "clear",
    "recover",
    "INCOMPLETE",
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


#: A file inside a folder whose contents are a store being created or cleared: a run killed
#: meanwhile leaves it, and the next run removes those contents (and only then the marker).
INCOMPLETE = ".gradcam_jax-incomplete"


def folder_state(path: Path) -> str:
    """What ``path`` is: ``"missing"``, ``"empty"`` (a folder), ``"store"`` (one of ours),
    ``"partial"`` (a store a killed run was creating or clearing), ``"file"`` or ``"foreign"``
    (a folder with other contents)."""
    path = Path(path)
    if not os.path.lexists(path):
        return "missing"
    if not path.is_dir():
        return "file"
    if read_config(path) is not None:
        return "store"
    if (path / INCOMPLETE).exists():
        return "partial"
    return "foreign" if any(path.iterdir()) else "empty"


def _probe_writable(path: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".tmp-probe-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputNotWritable(f"cannot write in the output {str(path)!r}: {e.strerror or e}.") from None


def check_output(path: Path) -> None:
    """Refuse an output that cannot hold a store, before anything is written to it: a file, a
    folder with other contents (never removed, never written), or a folder that is not
    writable (a complete store is only read)."""
    path = Path(path)
    state = folder_state(path)
    if state in ("file", "foreign"):
        what = "a file" if state == "file" else "a folder that is not a gradcam_jax store"
        raise NotAStore(
            f"{str(path)!r} exists and is {what}; it is left as it is. Choose another output "
            f"(a new or empty folder, or a store of this job)."
        )
    if state != "missing" and not (state == "store" and (read_config(path) or {}).get("complete")):
        _probe_writable(path)


@contextlib.contextmanager
def claim(path: str | os.PathLike, *, show: bool = True) -> Iterator[Path]:
    """Hold the store's lock (:func:`~.lock.store_lock`) and check it can be written
    (:func:`check_output`) for the ``with`` block -> the store's absolute path."""
    path = Path(os.fspath(path)).absolute()
    with store_lock(path, show=show):
        check_output(path)
        yield path


def clear(path: Path) -> None:
    """Remove everything inside ``path`` (a store of ours, or the leftovers of one), keeping the
    folder: the marker first, then ``zarr.json`` (so it is no store from then on), the rest,
    and the marker last, so that a run killed meanwhile leaves a recognisable partial store."""
    path = Path(path)
    marker = path / INCOMPLETE
    marker.touch()
    (path / "zarr.json").unlink(missing_ok=True)
    for entry in list(os.scandir(path)):
        if entry.name == INCOMPLETE:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    marker.unlink()


def recover(path: Path) -> None:
    """Tidy what a run killed while creating or clearing a store left in ``path``."""
    path = Path(path)
    if not (path / INCOMPLETE).exists():
        return
    if read_config(path) is None:
        clear(path)
    else:  # killed after the store was complete but before the marker went
        (path / INCOMPLETE).unlink(missing_ok=True)


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
    """Create the store in ``path`` (a new or empty folder, kept): the arrays first, the group's
    ``zarr.json`` with the configuration last, so that until it exists ``path`` holds no store
    (and the :data:`INCOMPLETE` marker says whose contents they are).

    ``layout`` maps each array name to ``(shape, dtype, chunks, fill_value, dimension_names)``.
    """
    zarr = _zarr()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    recover(path)
    if folder_state(path) != "empty":
        check_output(path)  # a file or a folder with other contents: refused, untouched
        raise FileExistsError(f"{str(path)!r} is not empty; choose another output.")
    (path / INCOMPLETE).touch()
    try:
        n = len(names)
        files = zarr.create_array(
            store=str(path / "files"),
            shape=(n,),
            dtype=str,
            chunks=(max(1, min(n, 65536)),),
            fill_value="",
            dimension_names=["record"],
        )
        if n:
            files[:] = np.array(names, dtype=object)
        for name, (shape, dtype, chunks, fill, dims) in layout.items():
            zarr.create_array(
                store=str(path / name),
                shape=shape,
                dtype=dtype,
                chunks=chunks,
                fill_value=fill,
                dimension_names=dims,
            )
        (path / PROGRESS).mkdir()
        zarr.open_group(str(path), mode="a", zarr_format=3, attributes={ATTR: dict(config, complete=False)})
    except BaseException:
        with contextlib.suppress(OSError):
            clear(path)
        raise
    (path / INCOMPLETE).unlink()


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
