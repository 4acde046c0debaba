"""``explain_dataset``: explain every record of a dataset on every device of every host.

One jitted step per global batch. The batch is sharded along the ``data`` axis of a
``jax.sharding.Mesh`` (by default all devices, ordered by process), so one CPU, one GPU, eight
GPUs, a TPU slice or several hosts run the same code. Inside the step (a ``shard_map``) each
device runs the model on its rows in micro-batches of ``device_batch`` records; because the
model always sees the same micro-batch shape, whatever the number of devices, the numbers it
produces — and so the store — do not depend on the device count.

Each process feeds its own block of every global batch (the rows its devices hold) from its
own Grain loader, and writes that block's rows of every output array: one Zarr chunk per array
per batch, followed by an atomic commit marker. See :mod:`._store` for the layout and why a
killed run resumes to the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _sources, _store

__all__ = ["explain_dataset", "DatasetRun"]

#: Default micro-batch (records per model call per device); see ``device_batch``.
DEFAULT_DEVICE_BATCH = 8


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DatasetRun:
    """What :func:`explain_dataset` did.

    Attributes:
      path: the store.
      records: records in the dataset.
      explained: records explained (over the whole job, once complete).
      unreadable: records skipped because they could not be read (see ``errors`` in the store).
      processed: records computed by this call (all processes); 0 when the job was complete.
      resumed_at: the first record this call computed (0 for a fresh run).
      seconds: wall time of this call's processing loop (compilation included).
      images_per_second: ``processed / seconds``.
      already_complete: the store was complete before this call: nothing was done.
    """

    path: Path
    records: int
    explained: int
    unreadable: int
    processed: int
    resumed_at: int
    seconds: float
    images_per_second: float
    already_complete: bool = False

    def results(self) -> "_store.Results":
        return _store.open_results(self.path)


def _to_float(x):
    """The default preprocessing for a bare tap: integer images to float32 on the 0-255 scale."""
    import jax.numpy as jnp

    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.integer) else x


class _PretrainedPreprocess:
    """``model.preprocess(x, size)`` as a hashable callable (so the compiled step is reused)."""

    def __init__(self, model, size: int):
        self.model, self.size = model, int(size)

    def __call__(self, x):
        return self.model.preprocess(x, self.size)

    def __eq__(self, other):
        return type(other) is type(self) and other.model is self.model and other.size == self.size

    def __hash__(self):
        return hash((id(self.model), self.size))


class _TopK:
    """Callable target: the K largest scores of each example (K maps per example)."""

    def __init__(self, k: int):
        self.k = int(k)

    def __call__(self, scores):
        import jax

        idx = jax.lax.top_k(jax.lax.stop_gradient(scores), self.k)[1]
        return jax.numpy.take_along_axis(scores, idx, axis=-1)

    def __eq__(self, other):
        return type(other) is type(self) and other.k == self.k

    def __hash__(self):
        return hash(("topk", self.k))


def _say(enabled: bool, *args):
    if enabled:
        print(*args, file=sys.stderr, flush=True)


def _digest_arrays(leaves) -> str:
    h = hashlib.sha256()
    for leaf in leaves:
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _resolve_model(model, layer, preprocess, size):
    """-> tap, preprocess, input size, class names, model name."""
    from .._tap import as_tap

    if hasattr(model, "tap") and hasattr(model, "preprocess") and hasattr(model, "module"):
        tap = model.tap_at(layer) if layer else model.tap
        size = int(size or getattr(model, "input_size", 224))
        pre = preprocess or _PretrainedPreprocess(model, size)
        names = list(getattr(model, "class_names", []) or []) or None
        return tap, pre, size, names, str(getattr(model, "name", type(model).__name__)), \
            (layer or getattr(model, "default_layer", None))
    if layer is not None:
        raise ValueError("layer= picks the layer of a zoo model; for your own model build the tap "
                         "at the layer you want (gcj.linen_tap(module, variables, layer=...)).")
    tap = as_tap(model)
    return tap, preprocess or _to_float, (int(size) if size else None), None, None, tap.name


def _resolve_methods(methods) -> Tuple[List[str], List[Callable], bool]:
    from .. import methods as _methods

    single = isinstance(methods, str) or callable(methods)
    items = [methods] if single else list(methods)
    if not items:
        raise ValueError("methods is empty: give a method name such as 'grad_cam', or a list of them.")
    names, fns = [], []
    for m in items:
        if isinstance(m, str):
            key = m.strip().lower().replace("-", "_")
            fns.append(_methods.get(key))
            names.append(key)
        elif callable(m):
            fns.append(m)
            names.append(getattr(m, "__name__", type(m).__name__))
        else:
            raise TypeError(f"a method must be a registered name or a function (A, dA) -> map; got {m!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"methods lists a method twice: {names}.")
    return names, fns, not single


_TOPK = re.compile(r"top[-_ ]?(\d+)", re.IGNORECASE)


def _resolve_target(target, n: int):
    """-> (kind, const, per_record, fn, K, description).

    kind: "top" | "index" | "multi" | "topk" | "fn"; const: a host array broadcast per record
    (index/multi), or None; per_record: an (N,) or (N, K) array or None.
    """
    if target is None:
        return "top", None, None, None, None, {"kind": "top"}
    if isinstance(target, str):
        m = _TOPK.fullmatch(target.strip())
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"target={target!r}: a string target is 'topK' (K >= 1), e.g. 'top3'.")
        k = int(m.group(1))
        return "topk", None, None, _TopK(k), k, {"kind": "topk", "k": k}
    if callable(target) and not hasattr(target, "shape"):
        name = getattr(target, "__qualname__", None) or type(target).__name__
        return "fn", None, None, target, None, {"kind": "fn", "name": str(name)}
    if isinstance(target, (bool, np.bool_)):
        raise TypeError("target must be None, an int, a list of ints, 'topK', a per-record int array or a callable.")
    if isinstance(target, (int, np.integer)):
        return "index", np.int32(target), None, None, None, {"kind": "index", "value": int(target)}
    if isinstance(target, (list, tuple)):
        if not target or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in target):
            raise TypeError(f"a list target must hold ints (K classes explained for every record); got {target!r}.")
        vals = [int(t) for t in target]
        return "multi", np.asarray(vals, np.int32), None, None, len(vals), {"kind": "multi", "value": vals}
    arr = np.asarray(target)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"an array target must hold integer class indices; got dtype {arr.dtype}.")
    if arr.ndim not in (1, 2) or arr.shape[0] != n:
        raise ValueError(f"an array target gives the class(es) of each record: shape ({n},) or ({n}, K); "
                         f"got {arr.shape}.")
    arr = arr.astype(np.int32)
    desc = {"kind": "per_record", "shape": list(arr.shape), "digest": _digest_arrays([arr])}
    return ("index" if arr.ndim == 1 else "multi"), None, arr, None, (None if arr.ndim == 1 else arr.shape[1]), desc


def _default_mesh(data_axis: str):
    import jax
    from jax.sharding import Mesh

    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (data_axis,))


def _process_blocks(sharding, batch: int) -> Tuple[int, int, int]:
    """-> (rows per process, this process's block index, number of blocks).

    Every process must hold one contiguous, equally sized slice of the batch axis.
    """
    import jax

    per_process: Dict[int, set] = {}
    for dev, idx in sharding.devices_indices_map((batch,)).items():
        sl = idx[0]
        start, stop, _ = sl.indices(batch)
        per_process.setdefault(dev.process_index, set()).update(range(start, stop))
    spans = {}
    for p, rows in per_process.items():
        lo, hi = min(rows), max(rows) + 1
        if len(rows) != hi - lo:
            raise ValueError(f"process {p} holds non-contiguous rows of the batch under this mesh; "
                             f"order the mesh's devices by process (the default mesh does).")
        spans[p] = (lo, hi)
    sizes = {hi - lo for lo, hi in spans.values()}
    starts = sorted(lo for lo, _ in spans.values())
    if len(sizes) != 1:
        raise ValueError(f"processes hold different numbers of rows of each batch ({spans}); use the "
                         f"same number of devices on every host.")
    rows = sizes.pop()
    if starts != [i * rows for i in range(len(spans))]:
        raise ValueError(f"the processes' slices of the batch overlap ({spans}): each process must "
                         f"hold a distinct slice of the '{sharding.spec[0]}' axis.")
    lo, _ = spans[jax.process_index()]
    return rows, lo // rows, len(spans)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def _compute(tap, x, t, *, pre, method_fns, method_axis, kind, target_fn, top, upsample, normalize,
             relu, interpolation, counterfactual, drop_tokens, grid):
    """One micro-batch: maps (float16), top classes, their probabilities, explained classes."""
    import jax
    import jax.numpy as jnp

    from .._core import TargetSpec, _activations_and_grads
    from .._explain import finish_maps, maps_from_grads

    x = pre(x)
    if kind == "top":
        spec = TargetSpec("top", None)
    elif kind in ("index", "multi"):
        spec = TargetSpec(kind, t)
    else:
        spec = TargetSpec("fn", target_fn)
    out = _activations_and_grads(tap, x, spec)
    scores = out.scores
    if not hasattr(scores, "ndim") or scores.ndim != 2:
        shape = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(f"explain_dataset needs a classifier: the model must return scores of shape "
                         f"(B, num_classes) (the store keeps the top classes and probabilities); it "
                         f"returned {shape}.")
    s32 = jax.lax.stop_gradient(scores).astype(jnp.float32)
    probs = jax.nn.softmax(s32, axis=-1)
    top_p, top_c = jax.lax.top_k(probs, top)
    if kind == "top":
        explained = jnp.argmax(jax.lax.stop_gradient(scores), axis=-1)
    elif kind in ("index", "multi"):
        explained = t
    elif kind == "topk":
        explained = jax.lax.top_k(jax.lax.stop_gradient(scores), target_fn.k)[1]
    else:
        explained = jnp.full(out.selected.shape, -1, jnp.int32)

    size = tuple(x.shape[1:3]) if upsample else None
    finish = functools.partial(finish_maps, size=size, relu=relu, upsample=upsample,
                               normalize=normalize, interpolation=interpolation)
    # The same (A, dA) for every method: one forward pass in all.
    maps = [maps_from_grads(out, fn, finish, counterfactual=counterfactual, drop_tokens=drop_tokens,
                            grid=grid) for fn in method_fns]
    m = jnp.stack(maps, axis=1) if method_axis else maps[0]
    return m.astype(jnp.float16), top_c.astype(jnp.int32), top_p, explained.astype(jnp.int32)


def step_options(pre, method_fns, method_axis, kind, target_fn, top, resolution, normalize, relu,
                 interpolation, counterfactual, drop_tokens, grid) -> tuple:
    """The static configuration of the step, as a hashable tuple (the key of its cache)."""
    return (("pre", pre), ("method_fns", tuple(method_fns)), ("method_axis", bool(method_axis)),
            ("kind", kind), ("target_fn", target_fn), ("top", int(top)),
            ("upsample", resolution == "input"), ("normalize", bool(normalize)), ("relu", bool(relu)),
            ("interpolation", interpolation), ("counterfactual", bool(counterfactual)),
            ("drop_tokens", int(drop_tokens)), ("grid", None if grid is None else tuple(int(g) for g in grid)))


@functools.lru_cache(maxsize=32)
def _build_step(mesh, data_axis: str, per_device: int, micro: int, options: tuple):
    """The jitted, sharded step ``(tap, x, t) -> (maps, classes, probs, targets)``."""
    import jax
    from jax.sharding import PartitionSpec as P

    compute = functools.partial(_compute, **dict(options))
    n_micro = per_device // micro

    def local(tap, x, t):
        xs = x.reshape((n_micro, micro) + x.shape[1:])
        ts = t.reshape((n_micro, micro) + t.shape[1:])
        outs = jax.lax.map(lambda xt: compute(tap, xt[0], xt[1]), (xs, ts))
        return jax.tree_util.tree_map(lambda o: o.reshape((per_device,) + o.shape[2:]), outs)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(data_axis), P(data_axis)),
                            out_specs=P(data_axis), check_vma=False)
    return jax.jit(sharded)


def _replicate(tree, sharding):
    import jax

    def put(leaf):
        a = np.asarray(leaf)
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree_util.tree_map(put, tree)


def _local_rows(arr, lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)`` of a global, batch-sharded array, from this process's shards."""
    if arr.is_fully_addressable:
        return np.asarray(arr)[lo:hi]
    out = np.empty((hi - lo,) + tuple(arr.shape[1:]), arr.dtype)
    for s in arr.addressable_shards:
        start, stop, _ = s.index[0].indices(arr.shape[0])
        a, b = max(start, lo), min(stop, hi)
        if a < b:
            out[a - lo:b - lo] = np.asarray(s.data)[a - start:b - start]
    return out


# --------------------------------------------------------------------------------------------
# Multi-process helpers
# --------------------------------------------------------------------------------------------


def _barrier(name: str):
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"gradcam_jax.dataset:{name}")


def _global_min(value: int) -> int:
    import jax

    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray([value], np.int64))))


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class _Writer:
    """Writes each batch's rows and then its commit marker, in order, on a background thread,
    while the next batches are loaded and computed."""

    def __init__(self, path: Path, n: int, batch: int, rows: int, block: int, first_step: int,
                 bar, bar_images: Callable[[int], int]):
        import zarr

        group = zarr.open_group(str(path), mode="r+")
        self.arrays = {name: group[name] for name in _store.ARRAYS}
        self.path, self.n, self.batch, self.rows, self.block = path, n, batch, rows, block
        self.first_step = first_step
        self.bar, self.bar_images = bar, bar_images
        self.errors = 0
        self.written = 0
        self.first_done: Optional[float] = None
        self.first_rows = 0
        self._q: "queue.Queue" = queue.Queue(maxsize=2)
        self._exc: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="gradcam_jax-writer", daemon=True)
        self._thread.start()

    def submit(self, item):
        while True:
            if self._exc is not None:
                raise RuntimeError("writing the store failed") from self._exc
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self):
        self.submit(None)
        self._thread.join()
        if self._exc is not None:
            raise RuntimeError("writing the store failed") from self._exc

    def _run(self):
        try:
            while True:
                item = self._q.get()
                if item is None:
                    return
                self._write(*item)
        except BaseException as e:  # reported to the main thread at its next submit / close
            self._exc = e
            # Unblock a main thread waiting on a full queue.
            while True:
                try:
                    self._q.get_nowait()
                except queue.Empty:
                    break

    def _write(self, step: int, outs, errors: np.ndarray, state, committed: bool):
        lo = step * self.batch + self.block * self.rows
        hi = min(lo + self.rows, self.n)
        k = max(0, hi - lo)
        local = [_local_rows(o, self.block * self.rows, (self.block + 1) * self.rows) for o in outs]
        if not committed:
            n_err = 0
            if k:
                maps, classes, probs, targets = (np.array(a[:k]) for a in local)
                errs = np.asarray(errors[:k]).astype(object)
                bad = errs != ""
                n_err = int(bad.sum())
                if n_err:
                    maps[bad] = np.nan
                    classes[bad] = -1
                    probs[bad] = np.nan
                    targets[bad] = -1
                self.arrays["maps"][lo:hi] = maps
                self.arrays["classes"][lo:hi] = classes
                self.arrays["probs"][lo:hi] = probs
                self.arrays["targets"][lo:hi] = targets
                self.arrays["errors"][lo:hi] = errs
            _store.write_marker(self.path, step, self.block, {
                "step": step, "block": self.block, "records": [lo, max(lo, hi)], "errors": n_err,
                "grain_state": state, "grain_first_step": self.first_step,
            })
            self.errors += n_err
            self.written += k
        if self.first_done is None:
            self.first_done = time.perf_counter()
            self.first_rows = self.bar_images(step)
        if self.bar is not None:
            self.bar.update(self.bar_images(step))
            if self.errors:
                self.bar.set_postfix(unreadable=self.errors, refresh=False)


# --------------------------------------------------------------------------------------------
# explain_dataset
# --------------------------------------------------------------------------------------------

_INFO_KEYS = {"complete", "summary", "root", "class_names"}


def _config_mismatch(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    keys = (set(old) | set(new)) - _INFO_KEYS
    return sorted(k for k in keys if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True))


def explain_dataset(source, model, *, methods: Union[str, Sequence[str], Callable] = "grad_cam",
                    target=None, out, batch_size: int = 32, mesh=None, resume: bool = True,
                    resolution: str = "layer", size: Optional[int] = None,
                    preprocess: Optional[Callable] = None, layer: Optional[str] = None,
                    device_batch: Optional[int] = None, top: int = 5, normalize: bool = True,
                    relu: bool = True, interpolation: str = "bilinear", counterfactual: bool = False,
                    drop_tokens: int = 0, grid: Optional[Tuple[int, int]] = None,
                    workers: Optional[int] = None, worker_processes: int = 0,
                    extensions: Optional[Sequence[str]] = None, progress: bool = True,
                    data_axis: str = "data") -> DatasetRun:
    """Explain every record of a dataset into a Zarr store, on all devices of all hosts; resumable.

    Args:
      source: a folder of images (read recursively, in sorted order), a list of image paths,
        an array ``(N, H, W, C)``, or any sequence / iterable of paths, encoded images or arrays.
        Image files are decoded and resized to ``size`` in Grain worker threads.
      model: a zoo model (``gradcam_jax.zoo.efficientnet_lite0()``: its tap, preprocessing,
        input size and class names are used) or a tap (``gcj.linen_tap(...)``, any
        ``tap(x, delta) -> (scores, A)``) with ``preprocess`` and ``size``.
      methods: a CAM method name (``"grad_cam"``, ``"grad_cam_plus_plus"``, ... any of
        :data:`gradcam_jax.methods.REGISTRY`) or a function ``(A, dA) -> map``; a list of them
        adds a method axis to ``maps``. All methods share one forward pass.
      target: what to explain, as in :func:`gradcam_jax.cam`: ``None`` (each record's top
        class), an int, a list of K ints (K maps per record), ``"topK"`` (each record's K most
        probable classes), an int array ``(N,)`` or ``(N, K)`` (per record, e.g. the labels),
        or a callable ``scores -> (B,)`` / ``(B, K)``.
      out: the store to write (a folder; created). On a shared file system for several hosts.
      batch_size: records per global step, over all devices and hosts. A multiple of the number
        of devices times ``device_batch``.
      mesh: a ``jax.sharding.Mesh`` with a ``data_axis`` axis; default: all devices (of all
        processes), ordered by process, on one axis ``"data"``.
      resume: continue an interrupted run of the same job in ``out`` (the default); a complete
        store is left as it is. ``False`` deletes an existing store and starts over.
      resolution: ``"layer"`` (maps at the tapped layer's resolution, e.g. 7 x 7: small stores)
        or ``"input"`` (upsampled to the model's input size).
      size: the side images are resized to (default: the zoo model's input size, else 224).
      preprocess: a jittable function from the loaded batch (``uint8`` ``(B, size, size, 3)``
        for images) to the model's input, run on device inside the step. Default: the zoo
        model's normalisation, else a cast to float32 (0-255 scale).
      layer: for a zoo model, the layer to explain at (default: its default layer).
      device_batch: records per model call on each device (default 8, or the largest divisor
        of each device's share up to 8). The store's bytes depend on it and not on the number of
        devices or hosts: two runs with the same ``device_batch`` give identical stores. Raise
        it on accelerators (e.g. 64 on a GPU) for throughput.
      top: how many of the most probable classes (and their probabilities) to keep per record.
      normalize, relu, interpolation, counterfactual, drop_tokens, grid: as in
        :func:`gradcam_jax.cam`.
      workers: loader threads decoding images ahead (default: the CPU count, at most 8).
      worker_processes: if > 0, Grain multiprocessing workers on top (hosts with many cores).
      extensions: image file endings read from a folder (default: common image formats).
      progress: show a progress bar with images/s and print a summary (process 0 only).
      data_axis: the mesh axis the batch is sharded along.

    Returns:
      A :class:`DatasetRun` (counts and timing); ``.results()`` opens the store
      (:func:`open_results`).

    Multi-host: call ``jax.distributed.initialize(...)`` first in every process (it must run
    before any other JAX call), then call this function with the same arguments everywhere.
    Each process reads only its own rows (its devices' slice of every global batch) and writes
    them; ``out`` must be on a file system all hosts share.

    Unreadable records (corrupt or truncated files, non-images) never stop the run: they are
    computed as blank images, stored with NaN maps, class -1 and their reason in ``errors``.
    """
    _store.require("grain", "zarr")
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ..postprocess import INTERPOLATIONS

    is_main = jax.process_index() == 0
    show = bool(progress) and is_main
    if resolution not in ("layer", "input"):
        raise ValueError(f"resolution={resolution!r}: use 'layer' (maps at the layer's resolution) or "
                         f"'input' (upsampled to the input size).")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r} is not one of {', '.join(INTERPOLATIONS)}.")
    if int(batch_size) < 1 or int(top) < 1:
        raise ValueError("batch_size and top must be >= 1.")
    batch_size, top = int(batch_size), int(top)

    tap, pre, size, class_names, model_name, layer_name = _resolve_model(model, layer, preprocess, size)
    method_names, method_fns, method_axis = _resolve_methods(methods)
    src = _sources.as_source(source, extensions)
    path = Path(os.fspath(out)).absolute()
    existing = _store.read_config(path) if resume else None
    if existing is not None and src.kind == "folder" and existing.get("source") == "folder" \
            and existing.get("files_digest") != src.digest():
        # The folder changed since the job started: the job is the list the store holds.
        import zarr

        names = [str(v) for v in _store.strings(zarr.open_group(str(path), mode="r")["files"][:])]
        _say(show, f"explain_dataset: the folder now lists {len(src)} images; continuing the job "
                   f"in {path} with the {len(names)} it listed when it started.")
        src = src.with_names(names)
    n = len(src)
    if n == 0:
        where = f" under {src.root!r}" if src.root else ""
        raise ValueError(f"the source has no records{where} (image files end in "
                         f"{', '.join(extensions or _sources.IMAGE_EXTENSIONS)}).")
    kind, const, per_record, target_fn, k_targets, target_desc = _resolve_target(target, n)
    if src.kind in ("folder", "paths") and size is None:
        size = 224

    # ---- devices and the layout of a global batch
    mesh = mesh if mesh is not None else _default_mesh(data_axis)
    if data_axis not in mesh.axis_names:
        raise ValueError(f"the mesh has axes {mesh.axis_names}; the batch is sharded along "
                         f"data_axis={data_axis!r}, which it lacks.")
    n_data = int(mesh.shape[data_axis])
    if batch_size % n_data:
        raise ValueError(f"batch_size={batch_size} does not split over the {n_data} devices of the mesh's "
                         f"'{data_axis}' axis; use a multiple of {n_data}.")
    per_device = batch_size // n_data
    if device_batch is None:
        micro = math.gcd(per_device, DEFAULT_DEVICE_BATCH)
    else:
        micro = int(device_batch)
        if micro < 1 or per_device % micro:
            raise ValueError(f"device_batch={micro} must divide each device's share of the batch "
                             f"({batch_size} / {n_data} devices = {per_device}); use a batch_size that is a "
                             f"multiple of {n_data * micro}.")
    batch_sharding = NamedSharding(mesh, P(data_axis))
    rows, block, n_blocks = _process_blocks(batch_sharding, batch_size)
    num_steps = -(-n // batch_size)
    workers = min(os.cpu_count() or 1, 8) if workers is None else int(workers)

    # ---- shapes: the loaded record, the model's outputs (traced once, nothing computed)
    rec_shape, rec_dtype = _sources.element_spec(src, size)
    options = step_options(pre, method_fns, method_axis, kind, target_fn, top, resolution, normalize,
                           relu, interpolation, counterfactual, drop_tokens, grid)
    t_shape = (k_targets,) if kind == "multi" else ()
    x_spec = jax.ShapeDtypeStruct((micro,) + tuple(rec_shape), rec_dtype)
    t_spec = jax.ShapeDtypeStruct((micro,) + t_shape, np.int32)
    scores_spec = jax.eval_shape(lambda tp, x: tp(pre(x))[0], tap, x_spec)
    if hasattr(scores_spec, "shape") and len(scores_spec.shape) == 2:
        num_classes = int(scores_spec.shape[-1])
        if top > num_classes:
            top = num_classes
            options = step_options(pre, method_fns, method_axis, kind, target_fn, top, resolution,
                                   normalize, relu, interpolation, counterfactual, drop_tokens, grid)
        checks = [v for v in (const, per_record) if v is not None]
        if kind == "topk" and k_targets > num_classes:
            raise ValueError(f"target='top{k_targets}' but the model has only {num_classes} classes.")
        for v in checks:
            if v.size and (v.min() < 0 or v.max() >= num_classes):
                bad = int(v.max() if v.max() >= num_classes else v.min())
                raise ValueError(f"target {bad} is out of range: the model has {num_classes} classes "
                                 f"(0 to {num_classes - 1}).")
    compute = functools.partial(_compute, **dict(options))
    out_specs = jax.eval_shape(compute, tap, x_spec, t_spec)
    map_shape = tuple(out_specs[0].shape[1:])
    tgt_shape = tuple(out_specs[3].shape[1:])

    # ---- the store
    config = {
        "format": _store.FORMAT,
        "num_records": n, "source": src.kind, "root": src.root, "files_digest": src.digest(),
        "batch_size": batch_size, "rows": rows, "processes": n_blocks, "device_batch": micro,
        "num_steps": num_steps, "record_shape": list(rec_shape), "record_dtype": str(rec_dtype),
        "model": model_name, "layer": layer_name, "model_digest": _digest_arrays(jax.tree_util.tree_leaves(tap)),
        "methods": method_names, "method_axis": method_axis, "target": target_desc,
        "target_axis": len(tgt_shape) == 1, "resolution": resolution, "map_shape": list(map_shape),
        "normalize": bool(normalize), "relu": bool(relu), "interpolation": interpolation,
        "counterfactual": bool(counterfactual), "drop_tokens": int(drop_tokens),
        "grid": None if grid is None else [int(g) for g in grid], "top": top,
        "class_names": class_names,
    }
    dims_maps = ["record"] + (["method"] if method_axis else []) + (["target"] if tgt_shape else [])
    dims_maps += ["y", "x"][: len(map_shape) + 1 - len(dims_maps)]
    layout = {
        "maps": ((n,) + map_shape, "float16", (rows,) + map_shape, np.nan, dims_maps),
        "targets": ((n,) + tgt_shape, "int32", (rows,) + tgt_shape, -1, ["record"] + (["target"] if tgt_shape else [])),
        "classes": ((n, top), "int32", (rows, top), -1, ["record", "rank"]),
        "probs": ((n, top), "float32", (rows, top), np.nan, ["record", "rank"]),
        "errors": ((n,), str, (rows,), "", ["record"]),
    }

    if is_main:
        existing = _store.read_config(path)
        if existing is not None and not resume:
            _say(show, f"explain_dataset: resume=False: deleting the existing store {path}")
            _store.delete_store(path)
            existing = None
        if existing is None:
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise FileExistsError(f"{str(path)!r} exists and is not a gradcam_jax store; choose another out=.")
            if path.exists():
                path.rmdir()
            _store.create_store(path, config, src.names, layout)
        elif not existing.get("complete"):
            _store.clean_partials(path)
    _barrier("created")

    stored = _store.read_config(path)
    if stored is None:
        raise FileNotFoundError(f"the store {str(path)!r} was not created (is out= on a file system all hosts share?).")
    diff = _config_mismatch(stored, config)
    if diff:
        detail = "; ".join(f"{k}: store has {stored.get(k)!r}, this run {config.get(k)!r}" for k in diff[:6])
        raise ValueError(f"{str(path)!r} holds a different job ({detail}). Use another out=, or "
                         f"resume=False (--no-resume) to start over.")
    if stored.get("complete"):
        if is_main:
            _store.drop_progress(path)  # a run killed while finalising may leave markers behind
        summ = stored.get("summary") or {}
        _say(show, f"explain_dataset: {path} is already complete ({n} records, "
                   f"{summ.get('unreadable', 0)} unreadable); nothing to do.")
        return DatasetRun(path, n, int(summ.get("explained", n)), int(summ.get("unreadable", 0)), 0, n, 0.0, 0.0, True)

    # ---- where to start: the first global batch some process has not committed
    mine = _store.read_markers(path, block)
    first_missing = next((s for s in range(num_steps) if (s, block) not in mine), num_steps)
    start = _global_min(first_missing)

    if start < num_steps:
        processed, seconds, first_done, first_rows = _run_steps(
            path=path, src=src, tap=tap, mesh=mesh, data_axis=data_axis, batch_sharding=batch_sharding,
            per_device=per_device, micro=micro, options=options, size=size, rec_shape=rec_shape,
            rec_dtype=rec_dtype, t_shape=t_shape, kind=kind, const=const, per_record=per_record,
            n=n, batch_size=batch_size, rows=rows, block=block, num_steps=num_steps, start=start,
            committed=mine, workers=workers, worker_processes=worker_processes, show=show)
    else:
        processed, seconds, first_done, first_rows = 0, 0.0, None, 0

    # ---- all blocks committed: finalise (process 0)
    _barrier("done")
    if is_main:
        markers = _store.read_markers(path)
        missing = [(s, b) for s in range(num_steps) for b in range(n_blocks) if (s, b) not in markers]
        if missing:
            raise RuntimeError(f"batches {missing[:5]} were not committed; rerun to finish the job.")
        unreadable = int(sum(m.get("errors", 0) for m in markers.values()))
        _store.finalize(path, {"images": n, "explained": n - unreadable, "unreadable": unreadable})
    _barrier("finalized")
    summ = _store.read_config(path).get("summary") or {}
    unreadable = int(summ.get("unreadable", 0))
    resumed_at = min(start * batch_size, n)
    total = processed
    rate = total / seconds if seconds > 0 else 0.0
    if show:
        how = f" (resumed at record {resumed_at})" if resumed_at else ""
        steady = ""
        if first_done is not None and seconds > first_done and total > first_rows:
            steady = f"; {(total - first_rows) / (seconds - first_done):.1f} images/s after the first batch"
        _say(True, f"explain_dataset: {n} records -> {path}: {n - unreadable} explained, {unreadable} "
                   f"unreadable (skipped; listed in 'errors'). This run: {total} records in "
                   f"{seconds:.1f} s, {rate:.1f} images/s{steady}{how}.")
    return DatasetRun(path, n, n - unreadable, unreadable, total, resumed_at, seconds, rate, False)


def _run_steps(*, path, src, tap, mesh, data_axis, batch_sharding, per_device, micro, options, size,
               rec_shape, rec_dtype, t_shape, kind, const, per_record, n, batch_size, rows, block,
               num_steps, start, committed, workers, worker_processes, show):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    # The loader: restart Grain's iterator from the state saved with the last committed batch
    # of this block. A pipeline that itself started mid-way (first_step > 0: no usable state
    # was saved) is rebuilt from the resume point instead; both give the same records.
    marker = committed.get((start - 1, block)) if start > 0 else None
    state = marker.get("grain_state") if marker else None
    first_step = start if (start > 0 and (state is None or marker.get("grain_first_step", 0) != 0)) else 0

    def build(first):
        return _sources.make_loader(
            src, size=size, shape=rec_shape, dtype=rec_dtype, batch=batch_size, rows=rows, block=block,
            num_steps=num_steps, targets=per_record, workers=workers, worker_processes=worker_processes,
            first_step=first)

    it = iter(build(first_step))
    if start > 0 and not first_step:
        try:
            it.set_state(state)
        except Exception:  # e.g. worker_processes changed: the saved state has another shape
            first_step = start
            it = iter(build(first_step))

    try:
        step_fn = _build_step(mesh, data_axis, per_device, micro, options)
    except TypeError:  # an unhashable preprocess / target / method: build it uncached
        step_fn = _build_step.__wrapped__(mesh, data_axis, per_device, micro, options)
    tap_r = _replicate(tap, NamedSharding(mesh, P()))
    t_local_const = None
    if const is not None:
        t_local_const = np.ascontiguousarray(np.broadcast_to(const, (rows,) + const.shape))
    elif per_record is None:
        t_local_const = np.zeros((rows,) + t_shape, np.int32)

    def global_images(step: int) -> int:
        return max(0, min(batch_size, n - step * batch_size))

    bar = None
    if show:
        try:
            from tqdm import tqdm

            bar = tqdm(total=n, initial=min(start * batch_size, n), unit="img", desc="explain",
                       dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
        except ImportError:  # pragma: no cover
            bar = None
    writer = _Writer(path, n, batch_size, rows, block, first_step, bar, global_images)
    t0 = time.perf_counter()
    ok = False
    try:
        for step in range(start, num_steps):
            batch = next(it)
            try:
                st = it.get_state()
                json.dumps(st)
            except Exception:
                st = None
            expect = step * batch_size + block * rows + np.arange(rows)
            if not np.array_equal(np.asarray(batch["row"]), expect):
                raise RuntimeError(f"the loader is out of step at batch {step}: expected records "
                                   f"{expect[0]}..{expect[-1]}, got {np.asarray(batch['row'])[:3]}...")
            x = jax.make_array_from_process_local_data(batch_sharding, np.asarray(batch["x"]),
                                                       (batch_size,) + tuple(rec_shape))
            t_local = np.asarray(batch["target"], np.int32) if per_record is not None else t_local_const
            t = jax.make_array_from_process_local_data(batch_sharding, t_local, (batch_size,) + tuple(t_local.shape[1:]))
            outs = step_fn(tap_r, x, t)
            writer.submit((step, outs, np.asarray(batch["error"]), st, (step, block) in committed))
        writer.close()
        ok = True
    finally:
        if not ok:
            try:
                writer._q.put_nowait(None)
            except queue.Full:
                pass
        close = getattr(it, "close", None)
        if close is not None:  # stop Grain's threads / worker processes, free their buffers
            try:
                close()
            except Exception:
                pass
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    processed = sum(global_images(s) for s in range(start, num_steps))
    first = None if writer.first_done is None else writer.first_done - t0
    return processed, seconds, first, writer.first_rows
