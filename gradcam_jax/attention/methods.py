"""Attention rollout, generic attention (Chefer et al.) and LeGrad: thin wrappers, one kernel each.

Each explainer checks its arguments (the input gate, the attention sites of ``fn``, the target
against the model's scores) and calls one jitted kernel whose static argument is a frozen
:class:`AttentionOptions`. Inside, the model's jaxpr is evaluated once with probes at every
attention site (:mod:`._capture`); the maps come out at the token grid and are finished like
Grad-CAM's (``drop_tokens`` / ``grid`` / ``upsample`` / ``normalize``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._callables import PytreeCallable, as_pytree
from .._grads import check_fn_target
from .._inputs import leaf_index
from .._maps import MapOptions, check_cam_input, finish_maps, kernel, to_grid
from .._tap import scores_fn
from .._targets import Target, TargetSpec, batch_size, fixed_top, pull_back, select_scores, target_spec
from ._capture import ATTENTION, Probe, block_outputs, evaluate, per_block, zero_deltas
from .formulas import HEAD_FUSIONS, generic_relevance, legrad_relevance, rollout
from .sites import AttentionSite, attention_sites, jaxpr_sites

__all__ = ["AttentionOptions", "attention_rollout", "generic_attention", "legrad"]


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """The static options of the attention kernels: map options, the sites, the read-out."""

    maps: MapOptions
    sites: tuple[AttentionSite, ...]
    size: tuple[int, ...] | None
    rank: int | None
    token: int = 0
    head_fusion: str = "mean"
    discard_ratio: float = 0.0


def _trace(fn, x, options: AttentionOptions):
    """The model's jaxpr as this kernel evaluates it, ``options.sites`` with their paths in it,
    and the paths of all of its sites (LeGrad's stream ends at the next one)."""
    closed, out_shape = jax.make_jaxpr(scores_fn(fn.fn), return_shape=True)(x)
    leaf = leaf_index(x, options.maps.input)
    found = jaxpr_sites(closed.jaxpr, len(jax.tree_util.tree_leaves(x)), leaf)
    paths = [f.path for f in found]
    if len(paths) <= max(s.ordinal for s in options.sites):
        raise ValueError("attention: the model's attention blocks changed between tracing and running it.")
    sites = tuple(dataclasses.replace(s, path=paths[s.ordinal]) for s in options.sites)
    return closed, out_shape, sites, paths


def _run(closed, out_shape, x, deltas: dict, probes: list[Probe]):
    """The model on ``x`` with probes: ``(scores, recorded values)``."""
    outs, found = evaluate(closed, jax.tree_util.tree_leaves(x), probes, deltas)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs), found


def _attention_probes(sites) -> list[Probe]:
    return list(dict.fromkeys(Probe(s.path, 0, ATTENTION) for s in sites))


def _finish(relevance, options: AttentionOptions, selected=None):
    """``(..., B, N)`` token relevance -> finished maps ``(B, [K,] *spatial)``."""
    m = options.maps
    rank = options.rank or 2

    def grid(r):
        return to_grid(r[..., None], m.drop_tokens, m.grid, rank)[..., 0]

    multi = relevance.ndim == 3  # (K, B, N)
    raw = jnp.moveaxis(jax.vmap(grid)(relevance), 0, 1) if multi else grid(relevance)
    return finish_maps(raw, m, options.size, rank, selected)


@kernel
def rollout_kernel(fn: PytreeCallable, x, *, options: AttentionOptions):
    """Attention rollout under ``jit`` (see :func:`attention_rollout`)."""
    closed, out_shape, sites, _ = _trace(fn, x, options)
    _, found = _run(closed, out_shape, x, zero_deltas(sites), _attention_probes(sites))
    blocks = per_block(found, sites)
    r = rollout(blocks, options.head_fusion, options.discard_ratio, options.token)
    return _finish(r, options)


@kernel
def generic_kernel(fn: PytreeCallable, x, target: TargetSpec, *, options: AttentionOptions):
    """Generic attention under ``jit``: one forward, one backward (see :func:`generic_attention`)."""
    closed, out_shape, sites, _ = _trace(fn, x, options)
    probes = _attention_probes(sites)

    def objective(deltas):
        scores, found = _run(closed, out_shape, x, deltas, probes)
        return select_scores(target, scores), found

    selected, pullback, found = jax.vjp(objective, zero_deltas(sites), has_aux=True)
    (grads,) = pull_back(pullback, selected)
    blocks = per_block(found, sites)
    if selected.ndim == 1:
        r = generic_relevance(blocks, per_block(grads, sites), options.token)
    else:
        dks = per_block(grads, sites, lead=1)
        r = jax.vmap(lambda *g: generic_relevance(blocks, list(g), options.token))(*dks)
    return _finish(r, options, selected)


@kernel
def legrad_kernel(
    fn: PytreeCallable, head: PytreeCallable, x, target: TargetSpec, *, options: AttentionOptions
):
    """LeGrad under ``jit``: one forward, one backward (see :func:`legrad`)."""
    closed, out_shape, sites, paths = _trace(fn, x, options)
    tokens = block_outputs(closed, sites, paths)
    by_path = dict(zip(dict.fromkeys(s.path for s in sites), tokens, strict=True))
    probes = _attention_probes(sites) + tokens

    def objective(deltas):
        scores, found = _run(closed, out_shape, x, deltas, probes)
        spec = fixed_top(target, scores)
        per_layer = [select_scores(spec, head(found[by_path[s.path]][s.scan_index])) for s in sites]
        return sum(per_layer[1:], per_layer[0]), select_scores(spec, scores)

    _, pullback, selected = jax.vjp(objective, zero_deltas(sites), has_aux=True)
    (grads,) = pull_back(pullback, selected)
    if selected.ndim == 1:
        r = legrad_relevance(per_block(grads, sites))
    else:
        r = jax.vmap(lambda *g: legrad_relevance(list(g)))(*per_block(grads, sites, lead=1))
    return _finish(r, options, selected)


def _options(
    fn,
    x,
    who,
    *,
    attention,
    token,
    drop_tokens,
    grid,
    upsample,
    normalize,
    interpolation,
    layout,
    input,
    **kw,
):
    """The shared checks; returns the kernel's options."""
    if not callable(fn):
        raise TypeError(
            f"{who}: expected a callable x -> scores (a model or a tap); got {type(fn).__name__}."
        )
    maps = MapOptions(upsample, normalize, True, interpolation, False, drop_tokens, grid, layout, input)
    size, rank = check_cam_input(x, maps, who)
    try:
        sites = attention_sites(fn, x, input=input, attention=attention)
    except ValueError as e:
        raise ValueError(str(e).replace("attention_sites:", f"{who}:", 1)) from None
    grids = {s.shape[2:] for s in sites}
    if len(grids) != 1 or next(iter(grids))[0] != next(iter(grids))[1]:
        raise ValueError(
            f"{who}: the attention blocks have query x key sizes {sorted(grids)}; these methods need "
            f"self-attention over one token sequence. Pick the blocks of one tower with attention= "
            f"(their names: {', '.join(sorted({s.name for s in sites})[:6])})."
        )
    n = sites[0].shape[-1]
    if isinstance(token, bool) or not 0 <= int(token) < n:
        raise ValueError(f"{who}: token={token!r} must index one of the {n} tokens (0 for a class token).")
    return AttentionOptions(maps, sites, size, rank, int(token), **kw)


def attention_rollout(
    fn: Callable,
    x,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    token: int = 0,
    attention: Any = None,
    drop_tokens: int = 1,
    grid=None,
    upsample: bool = True,
    normalize: bool = True,
    interpolation: str = "bilinear",
    layout: str | None = None,
    input: Any = None,
) -> jax.Array:
    """Attention rollout: how attention flows from the input tokens to one token, through every block.

    Per block, heads are fused (``head_fusion``), the lowest ``discard_ratio`` of the entries
    are zeroed, the residual connection is added as an identity and rows are renormalised:
    ``Â_l = rownorm(0.5 · A_l + 0.5 · I)``; the blocks are multiplied, ``R = Â_L ··· Â_1``, and
    row ``token`` of ``R`` (the class token's) is the map. One forward pass; class-agnostic.

    Args:
      fn: any JAX callable ``x -> scores`` holding attention (see :func:`attention_sites`).
      x: images ``(B, H, W, C)`` (a pytree with ``input=``, channels-first with ``layout=``).
      head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads.
      discard_ratio: the fraction of each fused map's smallest entries set to 0 (never the
        read-out token's own entry).
      token: the read-out row (0: a class token).
      attention: which blocks (see :func:`attention_sites`); default all.
      drop_tokens: leading tokens that are not patches (1: the class token; 1 + registers).
      grid, upsample, normalize, interpolation, layout, input: as in :func:`gradcam_jax.cam`.

    Returns:
      ``(B, H, W)`` maps (at the token grid ``(B, h, w)`` with ``upsample=False``).

    References:
      Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020,
      https://arxiv.org/abs/2005.00928.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(
            f"attention_rollout: head_fusion={head_fusion!r} is not one of {', '.join(HEAD_FUSIONS)}."
        )
    if not 0.0 <= float(discard_ratio) < 1.0:
        raise ValueError(f"attention_rollout: discard_ratio={discard_ratio!r} must be in [0, 1).")
    options = _options(
        fn, x, "attention_rollout", attention=attention, token=token, drop_tokens=drop_tokens, grid=grid,
        upsample=upsample, normalize=normalize, interpolation=interpolation, layout=layout, input=input,
        head_fusion=head_fusion, discard_ratio=float(discard_ratio),
    )  # fmt: skip
    return rollout_kernel(as_pytree(fn), x, options=options)


def generic_attention(
    fn: Callable,
    x,
    target: Target = None,
    *,
    token: int = 0,
    attention: Any = None,
    drop_tokens: int = 1,
    grid=None,
    upsample: bool = True,
    normalize: bool = True,
    interpolation: str = "bilinear",
    layout: str | None = None,
    input: Any = None,
) -> jax.Array:
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf, ICCV 2021), self-attention rule.

    With ``A_l`` each block's attention probabilities and ``∇A_l`` the gradient of the target
    score with respect to them (one forward and one backward pass for all blocks):
    ``R = I``; for each block in order ``R ← R + mean_h((∇A_l ⊙ A_l)⁺) · R``; the map is row
    ``token`` of ``R``. Works on encoder-only models and on dual encoders such as CLIP (explain
    the image tower with a text-prompted target: the image–text similarity; the text tower's
    attention does not depend on the image and is left out).

    Args:
      fn: any JAX callable ``x -> scores`` holding attention.
      x: images ``(B, H, W, C)`` (a pytree with ``input=``, channels-first with ``layout=``).
      target: as in :func:`gradcam_jax.grad_cam` (``None``: each example's top class; a list of
        K classes gives ``(B, K, H, W)`` from the same forward pass; a callable picks any score).
      token, attention, drop_tokens, grid, upsample, normalize, interpolation, layout, input:
        as in :func:`attention_rollout`.

    Returns:
      ``(B, H, W)`` maps, or ``(B, K, H, W)`` for K targets.

    References:
      Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
      Encoder-Decoder Transformers", ICCV 2021, https://arxiv.org/abs/2103.15679.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> w = jax.random.normal(jax.random.key(0), (4, 3))
      >>> def fn(x):  # 1 + 4 tokens of width 4, one attention block, a linear head on token 0
      ...     p = jax.nn.softmax(x @ jnp.swapaxes(x, 1, 2), axis=-1)
      ...     return (x + p @ x)[:, 0] @ w
      >>> gcj.generic_attention(fn, jnp.ones((2, 5, 4)), upsample=False).shape
      (2, 2, 2)
    """
    options = _options(
        fn, x, "generic_attention", attention=attention, token=token, drop_tokens=drop_tokens, grid=grid,
        upsample=upsample, normalize=normalize, interpolation=interpolation, layout=layout, input=input,
    )  # fmt: skip
    spec = target_spec(target, batch_size(x))
    check_fn_target(fn, x, spec, "generic_attention")
    return generic_kernel(as_pytree(fn), x, spec, options=options)


def legrad(
    fn: Callable,
    x,
    target: Target = None,
    *,
    head: Callable,
    attention: Any = None,
    drop_tokens: int = 1,
    grid=None,
    upsample: bool = True,
    normalize: bool = True,
    interpolation: str = "bilinear",
    layout: str | None = None,
    input: Any = None,
) -> jax.Array:
    """LeGrad: the sensitivity of each layer's own prediction to that layer's attention.

    For every block ``l``, its output tokens ``z_l`` (found on the residual stream) go through
    the model's own head, ``s_l = head(z_l)``; ``∇A_l`` is the gradient of the target's
    ``s_l`` with respect to block ``l``'s attention ``A_l`` (``z_l`` reaches the later blocks
    through ``stop_gradient``, so all layers take one forward and one backward pass). The map is
    ``mean_l mean_h mean_query (∇A_l)⁺``, its key columns after ``drop_tokens``.

    Args:
      fn: any JAX callable ``x -> scores`` holding pre-norm transformer blocks
        (``z + attention(norm(z))``, then ``+ mlp(norm(z))``).
      x: images ``(B, H, W, C)`` (a pytree with ``input=``, channels-first with ``layout=``).
      target: as in :func:`generic_attention`; ``None`` picks each example's top class from the
        model's scores, and that class is explained at every layer.
      head: ``tokens (B, N, D) -> scores``: the model's final norm and classifier (for CLIP, the
        post-norm, projection and the similarity to the text embedding).
      attention: which blocks to read, as in :func:`attention_rollout`. The default (``None``) is
        the last two blocks, the default of the authors' implementation (``layer_index=-2``):
        early blocks' tokens are poor inputs to the final head, and their positive gradients fall
        on the background (``benchmarks/bench_vit_quality.py``). ``attention=lambda site: True``
        reads every block.
      drop_tokens, grid, upsample, normalize, interpolation, layout, input: as in
        :func:`attention_rollout`.

    Returns:
      ``(B, H, W)`` maps, or ``(B, K, H, W)`` for K targets.

    References:
      Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, "LeGrad: An Explainability Method for
      Vision Transformers via Feature Formation Sensitivity", 2024, https://arxiv.org/abs/2404.03214.
    """
    if not callable(head):
        raise TypeError(
            f"legrad: head must be a callable tokens (B, N, D) -> scores; got {type(head).__name__}."
        )
    if attention is None:
        attention = [-2, -1]  # the last two blocks (one block: that block)
    options = _options(
        fn, x, "legrad", attention=attention, token=0, drop_tokens=drop_tokens, grid=grid,
        upsample=upsample, normalize=normalize, interpolation=interpolation, layout=layout, input=input,
    )  # fmt: skip
    spec = target_spec(target, batch_size(x))
    check_fn_target(fn, x, spec, "legrad")
    return legrad_kernel(as_pytree(fn), as_pytree(head), x, spec, options=options)
