"""Evaluating many perturbed forwards (or path points) in fixed-size chunks.

Perturbation methods, path integrals and metrics run one forward per (image, channel / window /
step / sample). Doing them all at once would need memory proportional to their number; one at
a time would waste the hardware. They run ``chunk`` at a time, ``vmap``-ed inside a chunk, so
memory is set by ``chunk`` alone and the model appears once in the compiled program.

:func:`map_in_chunks` loops over the chunks on the device (a ``lax.map`` inside the caller's
``jit``). An explainer described as :class:`Stages` (a clean pass, one item, a finish) runs
through :func:`run_chunked`: either in one jitted kernel with the chunks in a ``lax.map`` /
``lax.scan`` (:func:`run_on_device`), or from Python over one jitted chunk kernel
(:func:`run_on_host`) — XLA:CPU runs a model's forward+backward inside a loop body 1.6-1.9x
slower than the same program called once per chunk (jaxlib 0.10.2;
``benchmarks/bench_attribution.py --only scan``), though not a forward pass alone (see
:class:`Stages`). :func:`host_chunks` makes the choice.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "map_in_chunks",
    "chunked_vmap",
    "perturbations_per_step",
    "chunk_layout",
    "CHUNK_LOOPS",
    "host_chunks",
    "Stages",
    "run_on_device",
    "run_on_host",
    "run_chunked",
]

CHUNK_LOOPS = ("auto", "host", "device")


def chunk_layout(n_items: int, chunk: int) -> tuple[int, int]:
    """``(calls, per)``: ``ceil(n_items / chunk)`` chunks of ``ceil(n_items / calls)`` items (the
    chunk evened out; the last one padded)."""
    n_items = int(n_items)
    calls = -(-n_items // max(1, int(chunk)))
    return calls, -(-n_items // calls)


def map_in_chunks(batch_fn: Callable, n_items: int, chunk: int):
    """``batch_fn(idx)`` for ``idx = 0 .. n_items - 1``, about ``chunk`` indices per call.

    ``batch_fn`` maps an int32 index vector ``(c,)`` to a pytree of results with leading axis
    ``c``. The number of calls is ``ceil(n_items / chunk)``; the chunk is then evened out to
    ``ceil(n_items / calls)``, and the last call is padded with repeats of the first indices
    (their results dropped) — so there is no separate remainder computation to compile.
    """
    n_items = int(n_items)
    calls, per = chunk_layout(n_items, chunk)
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


def host_chunks(chunk_loop: str, trees, calls: int, who: str, auto_host: bool = True) -> bool:
    """Whether a chunked explainer runs its chunks from Python (``True``) or on the device.

    ``chunk_loop="auto"``: from Python when ``auto_host``, there is more than one chunk, no leaf
    of ``trees`` (the model, the input, the target, ...) is a ``jax.core.Tracer`` (not under the
    caller's ``jit`` / ``vmap`` / ``grad``) and every array is on a CPU device. ``"host"`` /
    ``"device"`` force either way (``"host"`` under a trace inlines every chunk).
    """
    if chunk_loop not in CHUNK_LOOPS:
        choices = ", ".join(map(repr, CHUNK_LOOPS))
        raise ValueError(
            f"{who}: chunk_loop={chunk_loop!r} is not one of {choices} (how several chunks run: "
            f"'auto' picks, 'host' loops in Python over one compiled chunk, 'device' loops inside XLA)."
        )
    if chunk_loop != "auto":
        return chunk_loop == "host"
    if calls < 2 or not auto_host:
        return False
    leaves = jax.tree_util.tree_leaves(trees)
    if any(isinstance(v, jax.core.Tracer) for v in leaves):
        return False
    platforms = {d.platform for v in leaves if isinstance(v, jax.Array) for d in v.devices()}
    return (platforms or {jax.default_backend()}) == {"cpu"}


@dataclasses.dataclass(frozen=True)
class Stages:
    """A chunked explainer in three traced stages (module-level functions: the instance is a
    static, hashable part of the compiled programs).

    ``start(args, options) -> carry``: the clean pass (the target fixed on the clean input, the
    activation, ...). ``count(args, carry, options) -> int``: the number of items (from shapes
    and options only). ``item(args, carry, i, options)``: item ``i`` (an int32 scalar; ``vmap``-ed
    over a chunk) — a pytree. ``finish(args, carry, out, options)``: the result from ``out``,
    the items stacked ``(n, ...)`` when ``weights`` is ``None``, else their weighted sum
    ``sum_i weights(options)[i] * item_i``. ``auto_host``: whether ``chunk_loop="auto"`` runs
    the chunks from Python on a CPU. Measured on XLA:CPU (jaxlib 0.10.2, EfficientNet-Lite0,
    96 px, batch 2, one thread), a loop body with a forward *and backward* pass runs no faster
    than the same chunk called from Python, and much slower on large programs (Integrated
    Gradients on ResNet-50, 224 px, batch 8: 0.98x the floor's throughput from Python, 0.57x in
    a ``lax.scan``), but a forward-only body runs faster (Score-CAM, Ablation-CAM, occlusion,
    RISE: the host loop at 0.78-0.96x the device loop's speed; ``benchmarks/README.md``, "The
    chunk loop of Score-CAM"): the perturbation explainers set ``auto_host=False``.
    """

    start: Callable
    count: Callable
    item: Callable
    finish: Callable
    weights: Callable | None = None
    auto_host: bool = True


def chunk_value(stages: Stages, args, carry, options, pos):
    """One chunk: the items at positions ``pos`` ``(per,)`` (``pos >= n`` pads: item ``pos % n``,
    weight 0), stacked or weighted and summed."""
    n = stages.count(args, carry, options)
    idx = pos % n
    out = jax.vmap(lambda i: stages.item(args, carry, i, options))(idx)
    if stages.weights is None:
        return out
    w = jnp.asarray(np.asarray(stages.weights(options), np.float64))
    w = jnp.where(pos < n, w[idx], 0)
    return jax.tree_util.tree_map(lambda o: jnp.tensordot(w.astype(o.dtype), o, 1), out)


def add(total, part):
    return jax.tree_util.tree_map(jnp.add, total, part)


def run_on_device(stages: Stages, args, options, per_step: int):
    """The stages traced into the caller's kernel, the chunks in one ``lax.map`` (items, through
    :func:`map_in_chunks`) or ``lax.scan`` (a weighted sum) — or inline for one chunk."""
    carry = stages.start(args, options)
    n = stages.count(args, carry, options)
    if stages.weights is None:

        def items(idx):
            return jax.vmap(lambda i: stages.item(args, carry, i, options))(idx)

        return stages.finish(args, carry, map_in_chunks(items, n, per_step), options)
    calls, per = chunk_layout(n, per_step)
    pos = jnp.arange(calls * per, dtype=jnp.int32).reshape(calls, per)

    def part(p):
        return chunk_value(stages, args, carry, options, p)

    if calls == 1:
        out = part(pos[0])
    else:
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(part, pos[0]))
        out = jax.lax.scan(lambda t, p: (add(t, part(p)), None), zeros, pos)[0]
    return stages.finish(args, carry, out, options)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static argument of the host loop's kernels."""

    stages: Stages
    options: Any
    per_step: int


@functools.partial(jax.jit, static_argnames=("plan",))
def start_kernel(args, *, plan: Plan):
    """The host loop's first kernel: ``stages.start``."""
    return plan.stages.start(args, plan.options)


@functools.partial(jax.jit, static_argnames=("plan",))
def chunk_kernel(args, carry, pos, *, plan: Plan):
    """The host loop's chunk (compiled once: every chunk, the padded last one too, has ``per``
    positions)."""
    return chunk_value(plan.stages, args, carry, plan.options, pos)


@functools.partial(jax.jit, static_argnames=("plan",))
def finish_kernel(args, carry, out, *, plan: Plan):
    """The host loop's last kernel: the chunks' items concatenated (or their sum), ``stages.finish``."""
    stages = plan.stages
    if stages.weights is None:
        n = stages.count(args, carry, plan.options)
        out = jax.tree_util.tree_map(lambda *ys: jnp.concatenate(ys)[:n], *out)
    return stages.finish(args, carry, out, plan.options)


def run_on_host(stages: Stages, args, options, per_step: int):
    """:func:`run_on_device`'s result with the chunks run from Python: a start kernel, one
    jitted chunk kernel per chunk (dispatched asynchronously, the results kept on the device;
    peak memory still set by ``per_step``), a finish kernel."""
    plan = Plan(stages, options, int(per_step))
    carry = start_kernel(args, plan=plan)
    calls, per = chunk_layout(stages.count(args, carry, options), per_step)
    parts, total = [], None
    for pos in np.arange(calls * per, dtype=np.int32).reshape(calls, per):
        part = chunk_kernel(args, carry, pos, plan=plan)
        if stages.weights is None:
            parts.append(part)
        else:
            total = part if total is None else add(total, part)
    return finish_kernel(args, carry, tuple(parts) if stages.weights is None else total, plan=plan)


def run_chunked(
    kernel: Callable,
    stages: Stages,
    args: tuple,
    options,
    *,
    n_items: int,
    per_step: int,
    chunk_loop: str,
    who: str,
):
    """``kernel(*args, options=options)`` (the explainer's jitted kernel, which calls
    :func:`run_on_device`), or :func:`run_on_host` when :func:`host_chunks` says so for
    ``n_items`` items in chunks of ``per_step``."""
    if host_chunks(chunk_loop, args, chunk_layout(n_items, per_step)[0], who, stages.auto_host):
        return run_on_host(stages, args, options, per_step)
    return kernel(*args, options=options)
