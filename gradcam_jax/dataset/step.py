"""The jitted, sharded step of a dataset run: one global batch in, its maps and classes out.

Inside the step (a ``shard_map`` over the mesh's data axis) each device runs the model on its
rows in micro-batches of ``micro`` records (``jax.lax.map``). Because the model always sees the
same micro-batch shape, whatever the number of devices, the numbers it produces — and so the
store — do not depend on the device count.

:class:`StepSpec` is the step's whole static configuration: one frozen, hashable object, the
key of :func:`build_step`'s cache, so a second run of the same job reuses the compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from .._grads import grads_for_spec
from .._maps import MapOptions, map_geometry, maps_from_grads
from .._tap import Tap
from .._targets import TargetSpec
from .targets import TopK

__all__ = [
    "ComputeOptions",
    "StepSpec",
    "compute",
    "output_shapes",
    "build_step",
    "step_function",
    "TARGET_KINDS",
]

#: How a run's target is given: each record's top class, a class (``index``) or K classes
#: (``multi``) per record, each record's K top classes (``topk``), or a callable (``fn``).
TARGET_KINDS = ("top", "index", "multi", "topk", "fn")


@dataclasses.dataclass(frozen=True)
class ComputeOptions:
    """What one micro-batch computes.

    preprocess: the loaded batch -> the model's input (on device).
    methods: raw-map formulas ``(A, dA) -> map``, all from one forward pass.
    method_axis: stack the methods' maps on an axis (a list of methods was given).
    target_kind: one of :data:`TARGET_KINDS`; index targets come in as the step's ``t``.
    target_fn: the callable of a ``topk`` (a :class:`~.targets.TopK`) or ``fn`` target.
    top: how many most probable classes to keep.
    maps: how raw maps are finished.
    """

    preprocess: Callable
    methods: tuple[Callable, ...]
    method_axis: bool
    target_kind: str
    target_fn: Callable | None
    top: int
    maps: MapOptions


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static configuration of the step: the mesh layout and :class:`ComputeOptions`."""

    mesh: Mesh
    data_axis: str
    per_device: int
    micro: int
    compute: ComputeOptions


def _target(options: ComputeOptions, t) -> TargetSpec:
    if options.target_kind == "top":
        return TargetSpec("top")
    if options.target_kind in ("index", "multi"):
        return TargetSpec(options.target_kind, t)
    return TargetSpec("fn", options.target_fn)


def _check_classifier(scores) -> None:
    if not hasattr(scores, "ndim") or scores.ndim != 2:
        shape = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(
            f"explain_dataset needs a classifier: the model must return scores of shape "
            f"(B, num_classes) (the store keeps the top classes and probabilities); it "
            f"returned {shape}."
        )


def _explained(options: ComputeOptions, scores, t, selected) -> jax.Array:
    """The classes explained: ``(B,)`` or ``(B, K)``; -1 for a callable target."""
    kind = options.target_kind
    if kind == "top":
        return jnp.argmax(jax.lax.stop_gradient(scores), axis=-1)
    if kind in ("index", "multi"):
        return t
    if isinstance(options.target_fn, TopK):
        return jax.lax.top_k(jax.lax.stop_gradient(scores), options.target_fn.k)[1]
    return jnp.full(selected.shape, -1, jnp.int32)


def compute(tap: Tap, x: jax.Array, t: jax.Array, options: ComputeOptions) -> tuple[jax.Array, ...]:
    """One micro-batch: maps (float16), top classes, their probabilities, explained classes."""
    x = options.preprocess(x)
    out = grads_for_spec(tap, x, _target(options, t))
    _check_classifier(out.scores)
    s32 = jax.lax.stop_gradient(out.scores).astype(jnp.float32)
    top_p, top_c = jax.lax.top_k(jax.nn.softmax(s32, axis=-1), options.top)
    explained = _explained(options, out.scores, t, out.selected)
    size, rank = map_geometry(x, options.maps, "explain_dataset")
    # The same (A, dA) for every method: one forward pass in all.
    maps = [maps_from_grads(out, fn, options.maps, size, rank) for fn in options.methods]
    m = jnp.stack(maps, axis=1) if options.method_axis else maps[0]
    return m.astype(jnp.float16), top_c.astype(jnp.int32), top_p, explained.astype(jnp.int32)


def output_shapes(
    tap: Tap, options: ComputeOptions, x_spec: jax.ShapeDtypeStruct, t_spec: jax.ShapeDtypeStruct
) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The shapes of :func:`compute`'s outputs for a micro-batch (traced; nothing computed)."""
    return jax.eval_shape(functools.partial(compute, options=options), tap, x_spec, t_spec)


@functools.lru_cache(maxsize=32)
def build_step(spec: StepSpec) -> Callable:
    """The jitted, sharded step ``(tap, x, t) -> (maps, classes, probs, targets)``.

    ``tap`` is replicated; ``x`` and ``t`` are global batches sharded along ``spec.data_axis``.
    """
    one = functools.partial(compute, options=spec.compute)
    n_micro = spec.per_device // spec.micro

    def local(tap, x, t):
        xs = x.reshape((n_micro, spec.micro) + x.shape[1:])
        ts = t.reshape((n_micro, spec.micro) + t.shape[1:])
        outs = jax.lax.map(lambda xt: one(tap, xt[0], xt[1]), (xs, ts))
        return jax.tree_util.tree_map(lambda o: o.reshape((spec.per_device,) + o.shape[2:]), outs)

    sharded = jax.shard_map(
        local,
        mesh=spec.mesh,
        in_specs=(P(), P(spec.data_axis), P(spec.data_axis)),
        out_specs=P(spec.data_axis),
        check_vma=False,
    )
    return jax.jit(sharded)


def step_function(spec: StepSpec) -> Callable:
    """:func:`build_step`, cached when ``spec`` is hashable (an unhashable preprocess, target or
    method gives a step built for this run only)."""
    try:
        hash(spec)
    except TypeError:
        return build_step.__wrapped__(spec)
    return build_step(spec)
