"""What the attribution methods share: the input gate and the explained input gradients.

Every method here explains a model called as ``x -> scores`` in the pixels of one image leaf
(any layout, a pytree input with ``input=``); targets follow :func:`gradcam_jax.grad_cam`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._grads import check_fn_target
from .._inputs import check_image_array, leaf_index, with_leaf
from .._targets import TargetSpec, batch_size, fixed_top, pull_back, select_scores, target_spec

__all__ = [
    "gate",
    "clean_target",
    "explained_grads",
    "targets_second",
    "per_target",
    "check_key",
    "check_positive_int",
    "check_baseline_shape",
    "steps_per_chunk",
    "CHUNK_LOOPS",
    "host_chunks",
    "chunked",
    "accumulate",
    "weighted_sum",
    "host_weighted_sum",
]

CHUNK_LOOPS = ("auto", "host", "device")


def gate(fn, x, target, input: Any, who: str) -> tuple[int, TargetSpec]:
    """The input gate of a pixel-space attribution: ``(image leaf, target spec)``.

    Refuses a non-callable model, an empty or integer image, a target the model's scores cannot
    give — before anything is compiled.
    """
    if not callable(fn):
        raise TypeError(
            f"{who}: fn must be a callable x -> scores (a model, an apply function or a tap); "
            f"got {type(fn).__name__}."
        )
    leaf = leaf_index(x, input, who)
    check_image_array(jax.tree_util.tree_leaves(x)[leaf], who)
    spec = target_spec(target, batch_size(x))
    check_fn_target(fn, x, spec, who)
    return leaf, spec


def clean_target(call: Callable, x, target: TargetSpec) -> tuple[TargetSpec, jax.Array]:
    """``(spec, y)``: the target with ``"top"`` fixed on the clean input ``x`` (every perturbed or
    interpolated copy then explains that class) and its clean scores, ``(B,)`` or ``(B, K)``."""
    clean = call(x)
    spec = fixed_top(target, clean)
    return spec, select_scores(spec, clean)


def targets_second(grads, selected):
    """``pull_back``'s K-first layout ``(K, B, ...)`` as the explainers return it: ``(B, K, ...)``."""
    return grads if selected.ndim == 1 else jnp.moveaxis(grads, 0, 1)


def explained_grads(call: Callable, x, leaf: int, spec: TargetSpec, image):
    """``(selected, d selected / d image)`` with the image leaf of ``x`` set to ``image``.

    ``selected`` is ``(B,)`` or ``(B, K)``; the gradients ``(B, ...)`` or ``(B, K, ...)``.
    """

    def explained(img):
        return select_scores(spec, call(with_leaf(x, leaf, img)))

    selected, pullback = jax.vjp(explained, image)
    (grads,) = pull_back(pullback, selected)
    return selected, targets_second(grads, selected)


def per_target(values, selected):
    """``values`` shaped like the image ``(B, ...)``, given a K axis when ``selected`` is ``(B, K)``."""
    return values if selected.ndim == 1 else values[:, None]


def check_key(key, who: str):
    """A ``jax.random`` key, or a clear error saying how to make one."""
    if key is None:
        raise TypeError(f"{who}: key= is required (randomness is explicit): pass key=jax.random.key(0).")
    if not isinstance(key, jax.Array):
        raise TypeError(f"{who}: key must be a jax.random key (jax.random.key(0)); got {type(key).__name__}.")
    return key


def check_positive_int(value, name: str, who: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``, or a ``ValueError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{who}: {name} must be an int >= {minimum}; got {value!r}.")
    return int(value)


def check_baseline_shape(baseline, image, who: str, name: str = "baseline"):
    """An array baseline broadcast to the image's shape and dtype, or a clear error."""
    baseline = jnp.asarray(baseline)
    if not jnp.issubdtype(baseline.dtype, jnp.floating) and not jnp.issubdtype(baseline.dtype, jnp.integer):
        raise TypeError(f"{who}: {name} must be numeric; got dtype {baseline.dtype}.")
    try:
        shape = jnp.broadcast_shapes(baseline.shape, image.shape)
    except ValueError:
        shape = None
    if shape != tuple(image.shape):
        raise ValueError(
            f"{who}: {name} of shape {baseline.shape} does not broadcast to the image {tuple(image.shape)}; "
            f"give one value, one per channel, one image, or one per example."
        )
    return jnp.broadcast_to(baseline.astype(image.dtype), image.shape)


def steps_per_chunk(chunk_size, steps: int, batch: int, who: str) -> int:
    """Path steps per chunk for ``chunk_size`` images (steps x batch) at once: all ``steps`` for
    ``None``, else ``chunk_size // batch`` clipped to ``[1, steps]``."""
    if chunk_size is None:
        return steps
    check_positive_int(chunk_size, "chunk_size", who)
    return max(1, min(steps, int(chunk_size) // max(batch, 1)))


def host_chunks(chunk_loop: str, trees, calls: int, who: str) -> bool:
    """Whether a chunked sum runs its chunks from Python (``True``) or in one ``lax.scan``.

    ``chunk_loop="auto"``: from Python when there is more than one chunk, no leaf of ``trees``
    (the model, the input, the target, ...) is a ``jax.core.Tracer`` (not under the caller's
    ``jit`` / ``vmap`` / ``grad``) and every array is on a CPU device. XLA:CPU runs a model's
    forward+backward inside a while loop (``lax.scan``) 1.6-1.9x slower than the same program
    called once per chunk (jaxlib 0.10.2; ``benchmarks/bench_attribution.py --only scan``).
    ``"host"`` / ``"device"`` force either way (``"host"`` under a trace inlines every chunk).
    """
    if chunk_loop not in CHUNK_LOOPS:
        choices = ", ".join(map(repr, CHUNK_LOOPS))
        raise ValueError(f"{who}: chunk_loop={chunk_loop!r} is not one of {choices}.")
    if chunk_loop != "auto":
        return chunk_loop == "host"
    if calls < 2:
        return False
    leaves = jax.tree_util.tree_leaves(trees)
    if any(isinstance(v, jax.core.Tracer) for v in leaves):
        return False
    platforms = {d.platform for v in leaves if isinstance(v, jax.Array) for d in v.devices()}
    return (platforms or {jax.default_backend()}) == {"cpu"}


def chunked(xs, weights, per_step: int):
    """``(xs, weights)`` cut into ``calls`` chunks of ``per`` elements: ``(calls, per, ...)``
    leaves and ``(calls, per)`` float64 weights; the last chunk is padded with copies of the
    first element at weight 0. NumPy leaves stay NumPy."""
    weights = np.asarray(weights, np.float64)
    n = weights.shape[0]
    per = max(1, min(int(per_step), n))
    calls = -(-n // per)
    pad = calls * per - n

    def padded(v):
        xp = np if isinstance(v, np.ndarray) else jnp
        v = xp.asarray(v)
        v = xp.concatenate([v, xp.repeat(v[:1], pad, axis=0)]) if pad else v
        return v.reshape((calls, per) + v.shape[1:])

    return jax.tree_util.tree_map(padded, xs), np.concatenate([weights, np.zeros(pad)]).reshape(calls, per)


def accumulate(f: Callable, total, xc, wc):
    """``total + sum_j wc[j] * f(xc[j])``: one chunk, ``f`` ``vmap``-ed over its elements."""
    out = jax.vmap(f)(xc)
    return jax.tree_util.tree_map(lambda t, o: t + jnp.tensordot(wc.astype(o.dtype), o, 1), total, out)


def weighted_sum(f: Callable, xs, weights, per_step: int):
    """``sum_i weights[i] * f(xs[i])`` (over the leading axis of the pytree ``xs``), ``per_step``
    elements at a time: ``vmap`` inside a chunk, a ``lax.scan`` over chunks (padded elements get
    weight 0), so peak memory is set by ``per_step`` and ``f`` is compiled once.
    """
    xs_c, w_c = chunked(xs, weights, per_step)
    first = jax.tree_util.tree_map(lambda v: v[0, 0], xs_c)
    shape = jax.eval_shape(f, first)
    total = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shape)

    def body(total, chunk):
        return accumulate(f, total, *chunk), None

    if w_c.shape[0] == 1:
        return accumulate(f, total, jax.tree_util.tree_map(lambda v: v[0], xs_c), jnp.asarray(w_c[0]))
    return jax.lax.scan(body, total, (xs_c, jnp.asarray(w_c)))[0]


def host_weighted_sum(step: Callable, total, xs, weights, per_step: int):
    """:func:`weighted_sum` with the chunks run from Python: ``total = step(total, xc, wc)`` per
    chunk, ``step`` one jitted kernel (compiled once: every chunk, the padded last one too, has
    the same shapes) that calls :func:`accumulate`. The calls are dispatched asynchronously and
    ``total`` stays on the device; peak memory is still set by ``per_step``.
    """
    xs_c, w_c = chunked(xs, weights, per_step)
    for i in range(w_c.shape[0]):
        total = step(total, jax.tree_util.tree_map(lambda v, i=i: v[i], xs_c), w_c[i])
    return total
