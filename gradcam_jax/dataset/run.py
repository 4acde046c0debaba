"""``explain_dataset``: explain every record of a dataset on every device of every host.

One jitted step per global batch (:mod:`.step`), sharded along the ``data`` axis of a
``jax.sharding.Mesh`` (:mod:`.plan`; by default all devices, ordered by process), so one CPU,
one GPU, eight GPUs, a TPU slice or several hosts run the same code, and the store's bytes do
not depend on the device count.

:func:`explain_dataset` describes the job once (:func:`.job.build_job`), creates the store or
checks that it holds the same job, finds the first batch not committed by every process, runs
the remaining batches (:mod:`.loop`: each process feeds its own block of every global batch
from its own Grain loader and writes that block's rows, :mod:`.writer`), and marks the store
complete. See :mod:`.store` for the layout and why a killed run resumes to the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from . import store
from .distributed import barrier, global_min, is_main
from .job import Arguments, Job, build_job, say
from .lock import OtherJob
from .loop import Work, run_steps
from .results import Results, open_results

__all__ = ["explain_dataset", "DatasetRun", "describe_job"]


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

    def results(self) -> Results:
        return open_results(self.path)


def explain_dataset(
    source: Any,
    model: Any,
    *,
    methods: str | Sequence[str | Callable] | Callable = "grad_cam",
    target: Any = None,
    out: str | os.PathLike,
    batch_size: int = 32,
    mesh: Mesh | None = None,
    resume: bool = True,
    resolution: str = "layer",
    size: int | None = None,
    preprocess: Callable | None = None,
    layer: str | None = None,
    device_batch: int | None = None,
    top: int = 5,
    normalize: bool = True,
    relu: bool = True,
    interpolation: str = "bilinear",
    counterfactual: bool = False,
    drop_tokens: int = 0,
    grid: tuple[int, int] | None = None,
    layout: str | None = None,
    workers: int | None = None,
    worker_processes: int = 0,
    extensions: Sequence[str] | None = None,
    progress: bool = True,
    data_axis: str = "data",
) -> DatasetRun:
    """Explain every record of a dataset into a Zarr store, on all devices of all hosts; resumable.

    Args:
      source: a folder of images (read recursively, in sorted order), a list of image paths,
        an array ``(N, H, W, C)``, or any sequence / iterable of paths, encoded images or arrays.
        Image files are decoded and resized to ``size`` in Grain worker threads.
      model: a zoo model (``gradcam_jax.zoo.efficientnet_lite0()``: its tap, preprocessing,
        input size and class names are used) or a tap (``gcj.linen_tap(...)``, any
        ``tap(x, delta) -> (scores, A)``) with ``preprocess`` and ``size``.
      methods: a CAM method name (``"grad_cam"``, ``"grad_cam_plus_plus"``, ... any of
        :data:`gradcam_jax.METHODS`'s gradient methods) or a function ``(A, dA) -> map``; a list of them
        adds a method axis to ``maps``. All methods share one forward pass.
      target: what to explain, as in :func:`gradcam_jax.cam`: ``None`` (each record's top
        class), an int, a list of K ints (K maps per record), ``"topK"`` (each record's K most
        probable classes), an int array ``(N,)`` or ``(N, K)`` (per record, e.g. the labels),
        or a callable ``scores -> (B,)`` / ``(B, K)``.
      out: the store to write (a folder: created, or an existing empty folder, which is kept). On
        a shared file system for several hosts. One run at a time: the run holds the lock file
        ``OUT.lock`` next to it (see :mod:`gradcam_jax.dataset.lock`).
      batch_size: records per global step, over all devices and hosts. A multiple of the number
        of devices times ``device_batch``.
      mesh: a ``jax.sharding.Mesh`` with a ``data_axis`` axis; default: all devices (of all
        processes), ordered by process, on one axis ``"data"``.
      resume: continue an interrupted run of the same job in ``out`` (the default); a complete
        store is left as it is. ``False`` deletes the contents of an existing store (never of a
        folder that is not a store, never of a store another run holds) and starts over.
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
      layout: the layout of the model's input, the output of ``preprocess``: ``None`` (the
        default) or ``"NHWC"`` for channels-last, ``"NCHW"`` for a model that takes
        channels-first images (Hugging Face ``pixel_values``), so that maps are upsampled to the
        image's height and width (``resolution="input"``). As in :func:`gradcam_jax.cam`; the
        store records it when given.
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

    Raises:
      StoreLocked: another run holds ``out`` (nothing was touched).
      OutputNotWritable: ``out`` (or the folder it goes in) cannot be written; also a
        ``PermissionError``.
      NotAStore: ``out`` is a file or a folder with other contents (left as it is); also a
        ``FileExistsError``.
      OtherJob: ``out`` holds a store of another job (``resume=False`` starts over); also a
        ``ValueError``.

    All four are :class:`~gradcam_jax.dataset.lock.OutputError` subclasses.
    """
    # long-function: the public signature (26 keywords) and its docstring are most of it; the body is short.
    args = Arguments(**locals())  # the parameters, as given: keep this the first statement
    store.require("grain", "zarr")
    # One run per store: process 0 holds its lock (refused with StoreLocked when another run
    # does) from before the job is described until the store is final.
    with store.claim(args.out) if is_main() else contextlib.nullcontext():
        return _run(build_job(args))


def _run(job: Job) -> DatasetRun:
    stored = _prepare_store(job)
    if stored.get("complete"):
        return _already_complete(job, stored)
    # Where to start: the first global batch some process has not committed.
    committed = store.read_markers(job.path, job.plan.block)
    first_missing = next(
        (s for s in range(job.plan.num_steps) if (s, job.plan.block) not in committed), job.plan.num_steps
    )
    start = global_min(first_missing)
    work = run_steps(job, start, committed) if start < job.plan.num_steps else Work()
    unreadable = _finalize(job)
    return _report(job, start, work, unreadable)


def describe_job(source: Any, model: Any, **options: Any) -> Job:
    """The :class:`~.job.Job` that ``explain_dataset(source, model, **options)`` would run, with
    the same defaults; nothing is computed or written (the model's shapes are traced)."""
    bound = inspect.signature(explain_dataset).bind(source, model, **options)
    bound.apply_defaults()
    return build_job(Arguments(**bound.arguments))


# --------------------------------------------------------------------------------------------
# The store: created once, checked by every process, finalised once
# --------------------------------------------------------------------------------------------


def _create_or_clean(job: Job) -> None:
    """(Process 0.) Create the store, or start over (``resume=False``), or tidy a killed run's."""
    path = job.path
    store.recover(path)
    existing = store.read_config(path)
    if existing is not None and not job.resume:
        say(job.show, f"explain_dataset: resume=False: deleting the existing store {path}")
        store.clear(path)  # the folder itself is kept
        existing = None
    if existing is None:
        store.create_store(path, job.store_config(), job.source.names, job.store_arrays())
    elif not existing.get("complete"):
        store.clean_partials(path)


def _prepare_store(job: Job) -> dict[str, Any]:
    """The store's configuration, once it exists and holds this job."""
    if is_main():
        _create_or_clean(job)
    barrier("created")
    path = job.path
    stored = store.read_config(path)
    if stored is None:
        raise FileNotFoundError(
            f"the store {str(path)!r} was not created (is out= on a file system all hosts share?)."
        )
    config = job.store_config()
    diff = store.config_mismatch(stored, config)
    if diff:
        detail = "; ".join(f"{k}: store has {stored.get(k)!r}, this run {config.get(k)!r}" for k in diff[:6])
        raise OtherJob(
            f"{str(path)!r} holds a different job ({detail}). Use another out=, or "
            f"resume=False (--no-resume) to start over."
        )
    return stored


def _already_complete(job: Job, stored: dict[str, Any]) -> DatasetRun:
    n = job.plan.num_records
    if is_main():
        store.drop_progress(job.path)  # a run killed while finalising may leave markers behind
    summary = stored.get("summary") or {}
    unreadable = int(summary.get("unreadable", 0))
    say(
        job.show,
        f"explain_dataset: {job.path} is already complete ({n} records, "
        f"{unreadable} unreadable); nothing to do.",
    )
    return DatasetRun(job.path, n, int(summary.get("explained", n)), unreadable, 0, n, 0.0, 0.0, True)


def _finalize(job: Job) -> int:
    """Once every block of every batch is committed: mark the store complete (process 0);
    -> the number of unreadable records."""
    barrier("done")
    plan = job.plan
    if is_main():
        markers = store.read_markers(job.path)
        missing = [(s, b) for s in range(plan.num_steps) for b in range(plan.blocks) if (s, b) not in markers]
        if missing:
            raise RuntimeError(f"batches {missing[:5]} were not committed; rerun to finish the job.")
        unreadable = int(sum(m.get("errors", 0) for m in markers.values()))
        n = plan.num_records
        store.finalize(job.path, {"images": n, "explained": n - unreadable, "unreadable": unreadable})
    barrier("finalized")
    summary = (store.read_config(job.path) or {}).get("summary") or {}
    return int(summary.get("unreadable", 0))


def _report(job: Job, start: int, work: Work, unreadable: int) -> DatasetRun:
    n = job.plan.num_records
    resumed_at = min(start * job.plan.batch_size, n)
    rate = work.processed / work.seconds if work.seconds > 0 else 0.0
    if job.show:
        how = f" (resumed at record {resumed_at})" if resumed_at else ""
        steady = ""
        first = work.first_seconds
        if first is not None and work.seconds > first and work.processed > work.first_rows:
            steady = (
                f"; {(work.processed - work.first_rows) / (work.seconds - first):.1f} images/s "
                f"after the first batch"
            )
        say(
            True,
            f"explain_dataset: {n} records -> {job.path}: {n - unreadable} explained, {unreadable} "
            f"unreadable (skipped; listed in 'errors'). This run: {work.processed} records in "
            f"{work.seconds:.1f} s, {rate:.1f} images/s{steady}{how}.",
        )
    return DatasetRun(
        job.path, n, n - unreadable, unreadable, work.processed, resumed_at, work.seconds, rate, False
    )
