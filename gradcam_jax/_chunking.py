"""Evaluating many perturbed forwards in fixed-size chunks under ``jit``.

Perturbation methods and metrics run one forward per (image, channel / window / step). Doing
them all at once would need memory proportional to their number; one at a time would waste the
hardware. :func:`map_in_chunks` runs them ``chunk`` at a time in a ``lax.map`` (a loop on the
device), so memory is set by ``chunk`` alone and the model appears once in the compiled program.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["map_in_chunks", "chunked_vmap", "perturbations_per_step"]


def map_in_chunks(batch_fn: Callable, n_items: int, chunk: int):
    """``batch_fn(idx)`` for ``idx = 0 .. n_items - 1``, about ``chunk`` indices per call.

    ``batch_fn`` maps an int32 index vector ``(c,)`` to a pytree of results with leading axis
    ``c``. The number of calls is ``ceil(n_items / chunk)``; the chunk is then evened out to
    ``ceil(n_items / calls)``, and the last call is padded with repeats of the first indices
    (their results dropped) — so there is no separate remainder computation to compile.
    """
    n_items = int(n_items)
    calls = -(-n_items // int(chunk))
    per = -(-n_items // calls)
    idx = jnp.arange(calls * per, dtype=jnp.int32) % n_items
    if calls == 1:
        return jax.tree_util.tree_map(lambda y: y[:n_items], batch_fn(idx))
    out = jax.lax.map(batch_fn, idx.reshape(calls, per))
    return jax.tree_util.tree_map(lambda y: y.reshape((calls * per,) + y.shape[2:])[:n_items], out)


def perturbations_per_step(chunk_size, batch: int) -> int:
    """Perturbations evaluated per step when each perturbation is a whole batch of ``batch``.

    ``chunk_size`` counts perturbed inputs (images); it is rounded down to whole batches, and
    at least one batch runs per step.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int (perturbed inputs per step, bounding peak memory); "
            f"got {chunk_size!r}."
        )
    return max(1, int(chunk_size) // max(int(batch), 1))


def chunked_vmap(f: Callable, xs, per_step: int):
    """``jax.vmap(f)(xs)`` evaluated ``per_step`` elements at a time (see :func:`map_in_chunks`)."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]

    def batch_fn(idx):
        return jax.vmap(f)(jax.tree_util.tree_map(lambda v: v[idx], xs))

    return map_in_chunks(batch_fn, n, per_step)
