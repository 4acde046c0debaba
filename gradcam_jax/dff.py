"""Deep Feature Factorization: concepts a layer's activations are made of, and where each one is.

The activations of a batch, as a channels x positions matrix ``V`` (every position of every
image: the concepts are shared by the batch), shifted per channel to be non-negative, are
factorised as ``V ≈ W H`` with non-negative ``W`` (channels x concepts: each concept's
embedding) and ``H`` (concepts x positions: where each concept is) by Lee & Seung's
multiplicative updates, ``steps`` of them in one jitted ``lax.fori_loop``. The classes a concept
stands for are what the part of the model above the layer scores for it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._grads import tap_shapes
from ._inputs import check_batch
from ._maps import MapOptions, kernel, map_geometry, to_grid
from ._tap import Tap, as_tap
from ._targets import batch_size
from .postprocess import normalize_maps, upsample_to

__all__ = ["DeepFeatures", "deep_feature_factorization", "nmf", "nmf_init"]

_EPS = 1e-10  # guards the updates' denominators (scikit-learn's solver="mu" uses float64 eps)


class DeepFeatures(NamedTuple):
    """What :func:`deep_feature_factorization` returns.

    concepts: ``(n, C)``, each concept's embedding in the layer's channels (``W``'s columns plus
      the channels' shift, so in the activation's own units).
    maps: ``(B, n, H, W)``: where each concept is in each image, upsampled and normalised to
      [0, 1] per image and concept (``(B, n, h, w)`` at the layer's resolution without upsampling).
    scores: ``(n, classes)``: the model's scores for an activation that is the concept at every
      position (for a pooling + linear head: the head applied to the embedding), or ``None``.
    top_classes: ``(n, top_k)`` class indices, each concept's highest scores first (or ``None``).
    """

    concepts: jax.Array
    maps: jax.Array
    scores: jax.Array | None
    top_classes: jax.Array | None


def nmf_init(v, n_components: int, key):
    """Random non-negative ``(W0, H0)`` for ``V`` ``(m, p)``: ``|N(0, 1)| * sqrt(mean(V) / n)``
    (scikit-learn's ``init="random"`` scale)."""
    scale = jnp.sqrt(jnp.mean(v) / n_components)
    kw, kh = jax.random.split(key)
    w = scale * jnp.abs(jax.random.normal(kw, (v.shape[0], n_components), v.dtype))
    h = scale * jnp.abs(jax.random.normal(kh, (n_components, v.shape[1]), v.dtype))
    return w, h


def nmf(v, w, h, steps: int):
    """``steps`` multiplicative updates of ``V ≈ W H`` (Frobenius loss), ``W`` then ``H``::

        W <- W * (V H^T) / (W H H^T)        H <- H * (W^T V) / (W^T W H)

    Non-negative ``W``, ``H`` stay non-negative and the loss never increases (Lee & Seung 2001).

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax.dff import nmf
      >>> v = jnp.outer(jnp.array([1.0, 2.0]), jnp.array([3.0, 1.0, 2.0]))  # rank 1
      >>> w, h = nmf(v, jnp.ones((2, 1)), jnp.ones((1, 3)), 50)
      >>> bool(jnp.allclose(w @ h, v, atol=1e-4))
      True

    References:
      Lee & Seung, "Algorithms for Non-negative Matrix Factorization", NeurIPS 2001.
    """
    hi = jax.lax.Precision.HIGHEST

    def step(_, wh):
        w, h = wh
        w = (
            w
            * jnp.matmul(v, h.T, precision=hi)
            / jnp.maximum(jnp.matmul(w, jnp.matmul(h, h.T, precision=hi)), _EPS)
        )
        h = (
            h
            * jnp.matmul(w.T, v, precision=hi)
            / jnp.maximum(jnp.matmul(jnp.matmul(w.T, w, precision=hi), h), _EPS)
        )
        return w, h

    return jax.lax.fori_loop(0, steps, step, (w, h))


@dataclasses.dataclass(frozen=True)
class DFFOptions:
    """The static options of :func:`dff_kernel`."""

    n_components: int
    steps: int
    top_k: int
    scores: bool
    maps: MapOptions


@kernel
def dff_kernel(tap: Tap, x, key, init, *, options: DFFOptions):
    """Deep Feature Factorization under ``jit`` (see :func:`deep_feature_factorization`)."""
    size, rank = map_geometry(x, options.maps, "deep_feature_factorization")
    rank = 2 if rank is None else rank
    _, act = tap(x)
    a = to_grid(act, options.maps.drop_tokens, options.maps.grid, rank).astype(jnp.float32)
    b, c = a.shape[0], a.shape[-1]
    v = jnp.nan_to_num(a.reshape(-1, c).T)  # (C, B * positions)
    offset = jnp.min(v, axis=1, keepdims=True)
    v = v - offset
    w0, h0 = nmf_init(v, options.n_components, key) if init is None else init
    w, h = nmf(v, w0, h0, options.steps)
    concepts = (w + offset).T  # (n, C)
    maps = jnp.moveaxis(h.reshape((options.n_components, b) + a.shape[1:-1]), 0, 1)  # (B, n, *spatial)
    if options.maps.upsample:
        maps = upsample_to(maps, size, options.maps.interpolation)
    maps = normalize_maps(maps, rank)
    if not options.scores:
        return DeepFeatures(concepts, maps, None, None)
    first = jax.tree_util.tree_map(lambda leaf: jnp.repeat(leaf[:1], options.n_components, axis=0), x)
    filled = jnp.broadcast_to(
        concepts.reshape((options.n_components,) + (1,) * (act.ndim - 2) + (c,)),
        (options.n_components,) + act.shape[1:],
    )
    scores = tap.head(first, filled.astype(act.dtype)).astype(jnp.float32)
    return DeepFeatures(concepts, maps, scores, jax.lax.top_k(scores, options.top_k)[1])


def _check_positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"deep_feature_factorization: {name} must be a positive int; got {value!r}.")
    return int(value)


def deep_feature_factorization(
    tap,
    x,
    n_components: int = 5,
    *,
    key=None,
    steps: int = 200,
    top_k: int = 2,
    scores: bool | None = None,
    init=None,
    upsample: bool = True,
    interpolation: str = "bilinear",
    drop_tokens: int = 0,
    grid: tuple[int, ...] | None = None,
    layout: str | None = None,
    input=None,
) -> DeepFeatures:
    """Deep Feature Factorization: ``n_components`` concepts of a layer, their maps and classes.

    With ``V`` the tapped activations of the whole batch as a channels x positions matrix,
    shifted per channel by its minimum, non-negative matrix factorisation ``V ≈ W H``
    (:func:`nmf`, ``steps`` multiplicative updates from a random start drawn from ``key``)
    gives the concepts' embeddings (``W``, plus the shift) and their maps (``H``, one row per
    concept, reshaped per image) — pytorch-grad-cam's ``DeepFeatureFactorization``, which
    factorises the same matrix with scikit-learn's ``NMF``. A concept's ``scores`` are the
    model's scores for an activation equal to the concept's embedding at every position, run
    through the layers above the tap (``tap.head``).

    Args:
      tap: the model split at a layer.
      x: the input batch (images ``(B, H, W, C)``; see :func:`gradcam_jax.cam`).
      n_components: the number of concepts.
      key: a ``jax.random`` key for the random start (required unless ``init`` is given).
      steps: multiplicative updates (a fixed number: no early stop, so one compiled program).
      top_k: classes per concept in ``top_classes``.
      scores: score the concepts (default: when the model returns ``(B, classes)`` scores).
      init: ``(W0, H0)``, ``(C, n)`` and ``(n, B * positions)``, a given start (e.g. another
        library's, for a comparison) instead of a random one.
      upsample, interpolation, drop_tokens, grid, layout, input: as in :func:`gradcam_jax.cam`.

    Returns:
      :class:`DeepFeatures` ``(concepts, maps, scores, top_classes)``.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> from gradcam_jax.dff import deep_feature_factorization
      >>> w = jax.random.normal(jax.random.key(0), (3, 4))
      >>> tap = gcj.split_tap(jax.nn.relu, lambda a: a.mean(axis=(1, 2)) @ w)
      >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
      >>> out = deep_feature_factorization(tap, x, 2, key=jax.random.key(2), steps=20)
      >>> out.concepts.shape, out.maps.shape, out.scores.shape, out.top_classes.shape
      ((2, 3), (2, 2, 8, 8), (2, 4), (2, 2))

    References:
      Collins et al., "Deep Feature Factorization For Concept Discovery", ECCV 2018,
      https://arxiv.org/abs/1806.10206.
    """
    # long-function: the docstring documents every option; the body is the checks and one kernel call.
    who = "deep_feature_factorization"
    n = _check_positive(n_components, "n_components")
    steps = _check_positive(steps, "steps")
    top_k = _check_positive(top_k, "top_k")
    maps = MapOptions(upsample, True, False, interpolation, False, drop_tokens, grid, layout, input)
    tap = as_tap(tap)
    check_batch(x, who)
    map_geometry(x, maps, who)
    score_spec, act_spec = tap_shapes(tap, x)
    if isinstance(act_spec, dict):
        raise ValueError(f"{who} factorises one layer; pick one of a multi-layer tap with tap.select(name).")
    classes = score_spec.shape[-1] if getattr(score_spec, "ndim", 0) == 2 else None
    if scores is None:
        scores = classes is not None
    if scores and classes is None:
        raise ValueError(
            f"{who}: scores=True needs a model returning (B, classes) scores; pass scores=False."
        )
    if scores and classes is not None and top_k > classes:
        raise ValueError(f"{who}: top_k={top_k} but the model has {classes} classes.")
    if init is None and key is None:
        raise ValueError(
            f"{who} needs key=jax.random.key(seed) for the factorisation's random start (or init=)."
        )
    if init is not None:
        init = _checked_init(init, act_spec, n, batch_size(x))
    options = DFFOptions(n, steps, top_k, bool(scores), maps)
    return dff_kernel(tap, x, key, init, options=options)


def _checked_init(init, act_spec, n: int, batch: int):
    w0, h0 = (jnp.asarray(a, jnp.float32) for a in init)
    c = act_spec.shape[-1]
    positions = int(np.prod(act_spec.shape[1:-1])) * batch
    if w0.shape != (c, n) or h0.shape != (n, positions):
        raise ValueError(
            f"deep_feature_factorization: init=(W0, H0) must have shapes ({c}, {n}) and ({n}, {positions}) "
            f"(channels x concepts, concepts x positions of the batch); got {w0.shape} and {h0.shape}."
        )
    return w0, h0
