"""The store writer: each batch's rows, then its commit marker, in order, on a background thread
while the next batches are loaded and computed.

Each process writes its own block of every batch: one chunk per array (the rows it holds), then
the marker that commits ``(step, block)`` (see :mod:`.store`).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import store
from .distributed import local_rows
from .plan import Plan

__all__ = ["Computed", "Writer", "WriteError"]


class WriteError(RuntimeError):
    """Writing the store failed (the cause is chained)."""


@dataclasses.dataclass(frozen=True)
class Computed:
    """One global batch, computed.

    outputs: the step's global ``(maps, classes, probs, targets)``.
    errors: why each of this process's records could not be read (``""``: it was).
    resume: what the commit marker records to resume the loader after this batch.
    committed: this block committed the batch already (a peer process was behind: the batch
      was computed again for it); nothing is written.
    """

    step: int
    outputs: tuple
    errors: np.ndarray
    resume: dict[str, Any]
    committed: bool


class Writer:
    """Writes :class:`Computed` batches in the order submitted, on a background thread.

    Attributes:
      errors: unreadable records written so far.
      first_done: ``time.perf_counter()`` when the first batch was done (``None`` before).
      first_rows: records (all processes) in that batch.
    """

    def __init__(self, path: Path, plan: Plan, bar=None):
        self.arrays = store.open_arrays(path)
        self.path, self.plan, self.bar = path, plan, bar
        self.errors = 0
        self.first_done: float | None = None
        self.first_rows = 0
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gradcam_jax-writer", daemon=True)
        self._thread.start()

    def submit(self, item: Computed | None) -> None:
        """Queue a batch (``None``: the end); raises :class:`WriteError` once a write failed."""
        while True:
            if self._exc is not None:
                raise WriteError("writing the store failed") from self._exc
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued, then stop; raises :class:`WriteError` if a write failed."""
        self.submit(None)
        self._thread.join()
        if self._exc is not None:
            raise WriteError("writing the store failed") from self._exc

    def abort(self) -> None:
        """Stop after the batches already queued (each is complete: committing it is right), so
        that nothing is written after the run returns; never raises."""
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                self._write(item)
        except BaseException as e:  # reported to the main thread at its next submit / close
            self._exc = e
            # Unblock a main thread waiting on a full queue.
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break

    def _write(self, item: Computed) -> None:
        if not item.committed:
            self._commit(item)
        images = self.plan.images(item.step)
        if self.first_done is None:
            self.first_done = time.perf_counter()
            self.first_rows = images
        if self.bar is not None:
            self.bar.update(images)
            if self.errors:
                self.bar.set_postfix(unreadable=self.errors, refresh=False)

    def _commit(self, item: Computed) -> None:
        """Write this block's rows of the batch (none past the last record), then its marker."""
        plan = self.plan
        lo = plan.first_row(item.step)
        hi = min(lo + plan.rows, plan.num_records)
        k = max(0, hi - lo)
        n_err = self._write_rows(lo, item, k) if k else 0
        store.write_marker(
            self.path,
            item.step,
            plan.block,
            {
                "step": item.step,
                "block": plan.block,
                "records": [lo, max(lo, hi)],
                "errors": n_err,
                **item.resume,
            },
        )
        self.errors += n_err

    def _write_rows(self, lo: int, item: Computed, k: int) -> int:
        """Rows ``[lo, lo + k)``: unreadable ones as NaN maps and -1 classes; -> their number."""
        first = self.plan.block * self.plan.rows
        maps, classes, probs, targets = (
            np.array(local_rows(o, first, first + self.plan.rows)[:k]) for o in item.outputs
        )
        errs = np.asarray(item.errors[:k]).astype(object)
        bad = errs != ""
        if bad.any():
            maps[bad] = np.nan
            classes[bad] = -1
            probs[bad] = np.nan
            targets[bad] = -1
        hi = lo + k
        self.arrays["maps"][lo:hi] = maps
        self.arrays["classes"][lo:hi] = classes
        self.arrays["probs"][lo:hi] = probs
        self.arrays["targets"][lo:hi] = targets
        self.arrays["errors"][lo:hi] = errs
        return int(bad.sum())
