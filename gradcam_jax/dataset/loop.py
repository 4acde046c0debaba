"""The batches of a run, from a resume point: load (Grain), compute (the jitted step), write.

Each process iterates its loader over its block of every global batch; the step runs on all
devices of all processes at once, and the writer commits this process's rows on a background
thread while the next batch is loaded and computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from typing import Any

import numpy as np

from .distributed import global_batch, replicate
from .job import Job
from .sources import BlockRows, LoadRecord, make_loader
from .step import step_function
from .writer import Computed, Writer

__all__ = ["Work", "run_steps", "open_loader"]


@dataclasses.dataclass(frozen=True)
class Work:
    """What :func:`run_steps` did: ``processed`` records (all processes) in ``seconds``; the
    first batch was done after ``first_seconds`` (``None``: no batch) and held ``first_rows``."""

    processed: int = 0
    seconds: float = 0.0
    first_seconds: float | None = None
    first_rows: int = 0


def _loader(job: Job, first_step: int):
    plan = job.plan
    load = LoadRecord(
        job.source, job.record, BlockRows(plan.batch_size, plan.rows, plan.block), job.targets.per_record
    )
    return iter(
        make_loader(
            load,
            plan.num_steps,
            workers=job.workers,
            worker_processes=job.worker_processes,
            first_step=first_step,
        )
    )


def _close(it) -> None:
    """Stop a loader's threads / worker processes and free their buffers."""
    close = getattr(it, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def open_loader(job: Job, start: int, committed: dict[tuple[int, int], dict[str, Any]]) -> tuple[Any, int]:
    """This process's loader, positioned at batch ``start`` -> ``(iterator, first_step)``.

    Grain's iterator restarts from the state saved with the block's last committed batch. A
    pipeline that itself started mid-way (``first_step > 0``: no usable state was saved) is
    rebuilt from the resume point instead; both give the same records.
    """
    marker = committed.get((start - 1, job.plan.block)) if start > 0 else None
    state = marker.get("grain_state") if marker else None
    resumable = marker is not None and state is not None and marker.get("grain_first_step", 0) == 0
    first_step = start if start > 0 and not resumable else 0
    it = _loader(job, first_step)
    if first_step or not start:
        return it, first_step
    try:
        it.set_state(state)
    except Exception:  # e.g. worker_processes changed: the saved state has another shape
        _close(it)
        return _loader(job, start), start
    return it, 0


def _loader_state(it) -> dict | None:
    """The iterator's state if it can be saved in a JSON marker, else ``None``."""
    try:
        state = it.get_state()
        json.dumps(state)
    except Exception:
        return None
    return state


def _progress_bar(job: Job, start: int):
    if not job.show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    n = job.plan.num_records
    return tqdm(
        total=n,
        initial=min(start * job.plan.batch_size, n),
        unit="img",
        desc="explain",
        dynamic_ncols=True,
        smoothing=0.1,
        mininterval=0.5,
    )


def _inputs(job: Job, step: int, batch: dict, fixed_targets: np.ndarray | None):
    """The step's global ``(x, t)`` from this process's loaded ``batch``."""
    plan = job.plan
    expect = plan.first_row(step) + np.arange(plan.rows)
    if not np.array_equal(np.asarray(batch["row"]), expect):
        raise RuntimeError(
            f"the loader is out of step at batch {step}: expected records "
            f"{expect[0]}..{expect[-1]}, got {np.asarray(batch['row'])[:3]}..."
        )
    t = np.asarray(batch["target"], np.int32) if fixed_targets is None else fixed_targets
    return (
        global_batch(np.asarray(batch["x"]), plan.sharding, plan.batch_size),
        global_batch(t, plan.sharding, plan.batch_size),
    )


def run_steps(job: Job, start: int, committed: dict[tuple[int, int], dict[str, Any]]) -> Work:
    """Compute and write batches ``start`` to the end; ``committed``: this block's markers."""
    plan = job.plan
    it, first_step = open_loader(job, start, committed)
    step_fn = step_function(job.step)
    tap = replicate(job.model.tap, plan.replicated)
    fixed_targets = job.targets.fixed_rows(plan.rows)
    bar = _progress_bar(job, start)
    writer, done = None, False
    t0 = time.perf_counter()
    try:
        writer = Writer(job.path, plan, bar)
        for step in range(start, plan.num_steps):
            batch = next(it)
            resume = {"grain_state": _loader_state(it), "grain_first_step": first_step}
            outputs = step_fn(tap, *_inputs(job, step, batch, fixed_targets))
            writer.submit(
                Computed(step, outputs, np.asarray(batch["error"]), resume, (step, plan.block) in committed)
            )
        writer.close()
        done = True
    finally:
        if writer is not None and not done:
            writer.abort()
        _close(it)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    first = None if writer.first_done is None else writer.first_done - t0
    processed = sum(plan.images(s) for s in range(start, plan.num_steps))
    return Work(processed, seconds, first, writer.first_rows)
