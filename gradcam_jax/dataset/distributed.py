"""What a dataset run needs from several ``jax.distributed`` processes; in a single process
each helper is a plain local operation.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["is_main", "barrier", "global_min", "replicate", "global_batch", "local_rows"]


def is_main() -> bool:
    """Whether this is process 0 (the one that creates and finalises the store, and reports)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"gradcam_jax.dataset:{name}")


def global_min(value: int) -> int:
    """The smallest of every process's ``value``."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def replicate(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Every array leaf of ``tree`` (the same on every process) as a global array on ``sharding``."""

    def put(leaf):
        a = np.asarray(leaf)
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree_util.tree_map(put, tree)


def global_batch(local: np.ndarray, sharding: jax.sharding.Sharding, batch_size: int) -> jax.Array:
    """The global ``(batch_size, ...)`` array of which ``local`` is this process's rows."""
    return jax.make_array_from_process_local_data(sharding, local, (batch_size,) + tuple(local.shape[1:]))


def local_rows(arr: jax.Array, lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)`` of a global, batch-sharded array, from this process's shards."""
    if arr.is_fully_addressable:
        return np.asarray(arr)[lo:hi]
    out = np.empty((hi - lo,) + tuple(arr.shape[1:]), arr.dtype)
    for s in arr.addressable_shards:
        start, stop, _ = s.index[0].indices(arr.shape[0])
        a, b = max(start, lo), min(stop, hi)
        if a < b:
            out[a - lo : b - lo] = np.asarray(s.data)[a - start : b - start]
    return out
