"""Reading a results store back: :func:`open_results` and :class:`Results` (see :mod:`.store`
for the layout)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .store import ATTR, read_config, require, strings

__all__ = ["Results", "open_results"]


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
        require("zarr")
        import zarr

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
