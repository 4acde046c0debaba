"""Attention sites: the attention-probability tensors of any JAX function, found by operations.

An **attention site** is a softmax over one axis (``exp(s - max) / sum(exp(s - max))``, what
``jax.nn.softmax`` is made of) whose result is contracted with values by a ``dot_general``
over that axis (the key axis). That is what every attention layer computes, whatever the
module that wrote it: ``flax.linen.MultiHeadDotProductAttention`` /
``dot_product_attention_weights``, ``flax.nnx.MultiHeadAttention``,
``equinox.nn.MultiheadAttention``, ``jax.nn.dot_product_attention(implementation="xla")``,
Hugging Face Flax ViT / CLIP attention, a hand-written ``softmax(q @ k.T) @ v``. Sites are
found in the jaxpr of ``fn`` (``jax.make_jaxpr``), inside ``jit``, ``remat``, custom-derivative
functions and ``scan`` (one site per scanned layer); inside ``cond`` / ``while`` they are found
and refused (their blocks cannot be read one by one). A softmax that is not
contracted with values (a classifier's output, a gating weight) is not a site, nor is one
that does not depend on the explained input (a CLIP text tower when the image is explained).

Only the image's batch axis, the key axis (the softmax's) and the query axis are needed to
read a site: every other axis is a head axis. The batch axis is the one whose size follows the
batch (``fn`` is traced a second time with one example more, abstractly: nothing runs); heads
merged into the batch axis (``(B * H, N, N)``) are split back.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax

from .._callables import hashable
from .._inputs import leaf_index
from .._tap import scores_fn
from ._jaxpr import CALLS, closed_parts, depends, is_var, sub_invars, sub_jaxprs
from .patterns import contracted, producers_of, softmax_axis

__all__ = ["AttentionSite", "attention_sites", "find_sites", "select_sites", "jaxpr_sites", "FUSED_HINT"]

_FUSED = ("dot_product_attention", "cudnn", "flash", "pallas_call", "mosaic", "triton", "splash")

FUSED_HINT = (
    "Fused attention kernels (cuDNN, Pallas / flash / splash attention) compute attention without "
    "materialising the probabilities, so there is nothing to read or differentiate. Run the model "
    "with the XLA implementation for explanation: jax.nn.dot_product_attention(..., "
    'implementation="xla") (or None on CPU), flax.linen / nnx attention with its default '
    "attention_fn, Hugging Face models with their default (non-flash) attention."
)


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention block's probabilities, as found in the jaxpr of the explained function.

    Attributes:
      name: the JAX name stack where the softmax was computed (for Flax models the module
        path, e.g. ``"vit/encoder/layer/3/attention/attention"``); ``""`` when there is none.
      shape: the probabilities as the methods read them, ``(B, heads, N_query, N_key)``.
      scan_index: for a layer inside ``lax.scan`` (``nn.scan``, ``nnx.scan``, a stacked
        Equinox model), its iteration, outermost first; ``()`` otherwise.
      path: where the softmax is in the jaxpr (equation indices and sub-jaxpr steps).
      raw_shape: the probabilities as the model holds them (one iteration of a scan).
      batch_axis, query_axis, key_axis: their axes in ``raw_shape``.
      merged_heads: heads folded into the batch axis (``B * merged_heads``), else 0.
      repeats: the lengths of the scans around the site, outermost first.
      reverse: which of those scans run backwards.
      ordinal: the site's place among the jaxpr's attention sites (a scanned site counts once).
    """

    name: str
    shape: tuple[int, ...]
    scan_index: tuple[int, ...]
    path: tuple[int, ...]
    raw_shape: tuple[int, ...]
    batch_axis: int
    query_axis: int
    key_axis: int
    merged_heads: int = 0
    repeats: tuple[int, ...] = ()
    reverse: tuple[bool, ...] = ()
    ordinal: int = 0

    @property
    def blocks(self) -> int:
        """How many attention blocks this jaxpr site is (the product of its scan lengths)."""
        return math.prod(self.repeats)


@dataclasses.dataclass(frozen=True)
class _Found:
    path: tuple[int, ...]
    name: str
    raw_shape: tuple[int, ...]
    key_axis: int
    repeats: tuple[int, ...]
    reverse: tuple[bool, ...]
    inside: str  # a loop or branch the capture cannot enter ("while", "cond"), else ""


def _walk(jaxpr, tainted, path, parents, repeats, reverse, inside, found, fused) -> None:
    # long-function: one pass over the equations: fused kernels, softmax sites, sub-jaxprs.
    labels = depends(jaxpr, tainted)
    producers = producers_of(jaxpr)
    for i, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        if any(tag in name for tag in _FUSED):
            fused.append(f"{name} at {eqn.source_info.name_stack or 'top level'}")
            continue
        axis = softmax_axis(eqn, producers)
        if axis is not None and "in" in labels.get(eqn.outvars[0], ()):
            out = eqn.outvars[0]
            n_key = out.aval.shape[axis]
            if contracted(jaxpr, labels, out, n_key, parents):
                stack = str(eqn.source_info.name_stack)
                found.append(_Found((*path, i), stack, tuple(out.aval.shape), axis, repeats, reverse, inside))
            continue
        subs = sub_jaxprs(eqn)
        if not subs:
            continue
        loop = name in ("scan", "while")
        any_in = any(is_var(v) and "in" in labels.get(v, ()) for v in eqn.invars)
        for k, sub in enumerate(subs):
            inner, _ = closed_parts(sub)
            if loop:  # coarse: a loop carrying anything that depends on x depends on it throughout
                inner_tainted = set(inner.invars) if any_in else set()
            else:
                inner_tainted = {
                    sv
                    for p, sv in sub_invars(eqn, k)
                    if is_var(eqn.invars[p]) and "in" in labels.get(eqn.invars[p], ())
                }
            more_r, more_v, more_in = repeats, reverse, inside
            if name == "scan":
                more_r = (*repeats, int(eqn.params["length"]))
                more_v = (*reverse, bool(eqn.params["reverse"]))
            elif name not in CALLS:
                more_in = inside or name  # while, cond, shard_map...: found, not captured
            step = (*path, i, k)
            _walk(
                inner,
                inner_tainted,
                step,
                (*parents, (jaxpr, labels, eqn)),
                more_r,
                more_v,
                more_in,
                found,
                fused,
            )


def _trace(fn, x, leaf: int, batch: int) -> list[_Found]:
    def grow(a):
        return jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype)

    spec = jax.tree_util.tree_map(grow, x)
    closed = jax.make_jaxpr(scores_fn(fn))(spec)
    return jaxpr_sites(closed.jaxpr, len(jax.tree_util.tree_leaves(spec)), leaf)


def jaxpr_sites(jaxpr, n_leaves: int, leaf: int) -> list:
    """The attention sites of a traced model (``jaxpr`` of ``x -> scores``, ``x`` with ``n_leaves``
    arrays, the image its ``leaf``-th), in call order, one per jaxpr site (a scanned site once).

    The kernels call this on the jaxpr they evaluate: traced with concrete weights (outside
    ``jit``) a model can have fewer equations than with traced ones, so paths are found again
    there and matched to the :class:`AttentionSite` list by order (:attr:`AttentionSite.ordinal`).
    """
    # (a pytree input with non-array leaves: all of x counts as the image)
    tainted = set(jaxpr.invars) if n_leaves != len(jaxpr.invars) else {jaxpr.invars[leaf]}
    found: list[_Found] = []
    fused: list[str] = []
    _walk(jaxpr, tainted, (), (), (), (), "", found, fused)
    if fused:
        raise ValueError(
            f"attention_sites: the model computes attention with a fused kernel ({'; '.join(fused[:3])}). "
            + FUSED_HINT
        )
    return found


def _batch_axis(a: _Found, b: _Found, batch: int) -> tuple[int, int]:
    """``(axis, merged heads)``: the axis whose size follows the batch (``batch`` vs ``batch + 1``)."""
    changed = [d for d, (m, n) in enumerate(zip(a.raw_shape, b.raw_shape, strict=True)) if m != n]
    if len(changed) != 1:
        raise ValueError(
            f"attention_sites: cannot tell the batch axis of the attention probabilities at "
            f"{a.name or a.path} (shape {a.raw_shape}); pass the batch first in x."
        )
    d = changed[0]
    heads = b.raw_shape[d] - a.raw_shape[d]
    if heads == 1:
        return d, 0
    if a.raw_shape[d] != heads * batch:
        raise ValueError(
            f"attention_sites: the probabilities at {a.name or a.path} have shape {a.raw_shape}; their axis "
            f"{d} grows by {heads} per example but is not batch x heads."
        )
    return d, heads


def _grown(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    d = shape.index(batch) if batch in shape else 0
    return tuple(n + 1 if i == d else n for i, n in enumerate(shape))


def _query_axis(shape: tuple[int, ...], batch_axis: int, key_axis: int) -> int:
    """The query axis: of the other axes, the last one as long as the key axis (self-attention),
    else the last one (cross-attention)."""
    rest = [d for d in range(len(shape)) if d not in (batch_axis, key_axis)]
    if not rest:
        raise ValueError(f"attention_sites: probabilities of shape {shape} have no query axis.")
    same = [d for d in rest if shape[d] == shape[key_axis]]
    return (same or rest)[-1]


def _canonical_shape(shape, batch_axis, query_axis, key_axis, merged, batch) -> tuple[int, ...]:
    heads = math.prod(n for d, n in enumerate(shape) if d not in (batch_axis, query_axis, key_axis))
    heads *= merged or 1
    return (batch, heads, shape[query_axis], shape[key_axis])


#: ``find_sites`` results by (function, input shapes): explaining one model with several methods
#: traces it once, as ``jit`` compiles once (functions keyed as ``jit``'s static arguments are).
_FOUND: collections.OrderedDict = collections.OrderedDict()


def find_sites(fn: Callable, x, input: Any = None, who: str = "attention_sites") -> tuple[AttentionSite, ...]:
    """Every attention site of ``fn`` at ``x`` that depends on the image, one per block, in call
    order (see the module docstring). Shapes only: nothing is computed; the result is kept for
    the same function and input shapes (the 64 most recent)."""
    leaves, tree = jax.tree_util.tree_flatten(x)
    key = (hashable(fn), tree, tuple((tuple(v.shape), str(v.dtype)) for v in leaves), hashable(input))
    if key in _FOUND:
        _FOUND.move_to_end(key)
        return _FOUND[key]
    sites = _find_sites(fn, x, input, who)
    _FOUND[key] = sites
    if len(_FOUND) > 64:
        _FOUND.popitem(last=False)
    return sites


def _find_sites(fn: Callable, x, input: Any, who: str) -> tuple[AttentionSite, ...]:
    leaf = leaf_index(x, input, who)
    batch = jax.tree_util.tree_leaves(x)[0].shape[0]
    first = _trace(fn, x, leaf, batch)
    try:
        second = _trace(fn, x, leaf, batch + 1)
    except Exception:  # a model written for one batch size: the batch axis is the first of size B
        second = [dataclasses.replace(f, raw_shape=_grown(f.raw_shape, batch)) for f in first]
    # Matched by call order (a batch of one can trace to a jaxpr with fewer equations).
    if [len(f.raw_shape) for f in first] != [len(f.raw_shape) for f in second]:
        raise ValueError(f"{who}: the model's attention blocks change with the batch size; cannot read them.")
    out = []
    for ordinal, (a, b) in enumerate(zip(first, second, strict=True)):
        batch_axis, merged = _batch_axis(a, b, batch)
        query_axis = _query_axis(a.raw_shape, batch_axis, a.key_axis)
        shape = _canonical_shape(a.raw_shape, batch_axis, query_axis, a.key_axis, merged, batch)
        raw = a.raw_shape
        for index in _iterations(a.repeats, a.reverse):
            out.append(
                AttentionSite(
                    a.name,
                    shape,
                    index,
                    a.path,
                    raw,
                    batch_axis,
                    query_axis,
                    a.key_axis,
                    merged,
                    a.repeats,
                    a.reverse,
                    ordinal,
                )  # fmt: skip
            )
        if a.inside:
            raise ValueError(
                f"{who}: an attention block ({a.name or a.path}) runs inside lax.{a.inside}, whose "
                f"iterations or branches cannot be read one by one. Unroll the loop (a Python for loop or "
                f"lax.scan over the layers) for explanation."
            )
    return tuple(out)


def _iterations(repeats: tuple[int, ...], reverse: tuple[bool, ...]) -> list[tuple[int, ...]]:
    """Scan iterations in the order they run (a reverse scan runs its last index first)."""
    order: list[tuple[int, ...]] = [()]
    for n, back in zip(repeats, reverse, strict=True):
        steps = range(n - 1, -1, -1) if back else range(n)
        order = [(*o, s) for o in order for s in steps]
    return order


def select_sites(sites: Sequence[AttentionSite], attention, who: str) -> tuple[AttentionSite, ...]:
    """The sites ``attention=`` picks: ``None`` (all), a glob pattern or a list of them matched
    against :attr:`AttentionSite.name`, a list of indices into ``sites``, or a callable
    ``site -> bool``. Refuses an empty choice, naming the sites there are."""
    sites = tuple(sites)
    if attention is None:
        chosen = sites
    elif callable(attention):
        chosen = tuple(s for s in sites if attention(s))
    else:
        items = [attention] if isinstance(attention, (str, int)) else list(attention)
        items = [p % len(sites) if isinstance(p, int) and sites else p for p in items]  # -1: the last
        chosen = tuple(s for i, s in enumerate(sites) if any(_picks(p, i, s) for p in items))
    if not chosen:
        listed = "; ".join(f"{i}: {s.name or s.path}" for i, s in enumerate(sites[:12]))
        raise ValueError(
            f"{who}: attention={attention!r} picks none of the model's {len(sites)} attention blocks "
            f"({listed}{' ...' if len(sites) > 12 else ''}). Pass names (glob patterns), indices or a "
            f"callable."
        )
    return chosen


def _picks(item, i: int, site: AttentionSite) -> bool:
    """An index, or a glob pattern on the site's name — with or without its first component, the
    top module's class (``"ViT/Block_1/..."`` is ``"Block_1/..."`` as the Linen and Hugging Face
    adapters name layers)."""
    if isinstance(item, int):
        return i == item
    return fnmatch.fnmatchcase(site.name, item) or fnmatch.fnmatchcase(site.name.partition("/")[2], item)


def attention_sites(
    fn: Callable, x, *, input: Any = None, attention: Any = None
) -> tuple[AttentionSite, ...]:
    """The attention blocks of ``fn`` at ``x``: one :class:`AttentionSite` per block, in call order.

    Finds every attention-probability tensor — a softmax over the key axis whose result is
    contracted with values — in the computation of ``fn``, whatever wrote it (Flax Linen / NNX,
    Equinox, Hugging Face, ``jax.nn.dot_product_attention(implementation="xla")``, hand-written),
    inside ``jit``, ``remat`` and ``scan``. Only blocks that depend on the image count (in a CLIP
    model explained through its image, the text tower's attention does not). Nothing runs: the
    model is traced abstractly, twice (the second time with one more example, to tell the
    batch axis).

    Args:
      fn: any JAX callable ``x -> scores`` (a model's apply closure, an Equinox model, a tap).
      x: the input batch (or a pytree whose image ``input=`` picks).
      input: for a pytree input, the image leaf (see :func:`gradcam_jax.cam`).
      attention: keep only some blocks: glob pattern(s) on :attr:`AttentionSite.name` (the
        module path for Flax models, as the adapters name layers: ``"encoder/layer/1/*"``),
        indices (``[-2, -1]``: the last two blocks), or a callable ``site -> bool``.

    Returns:
      A tuple of :class:`AttentionSite`; ``site.shape`` is ``(B, heads, N_query, N_key)``.

    Raises:
      ValueError: ``fn`` has no attention (nothing to explain with attention methods), or
        computes it with a fused kernel that never materialises the probabilities (the message
        says how to run it with the XLA implementation).

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> def fn(x):  # one hand-written attention block over 5 tokens
      ...     p = jax.nn.softmax(x @ jnp.swapaxes(x, 1, 2), axis=-1)
      ...     return (p @ x).mean(axis=1)
      >>> [s.shape for s in gcj.attention_sites(fn, jnp.ones((2, 5, 4)))]
      [(2, 1, 5, 5)]
    """
    if not callable(fn):
        raise TypeError(f"attention_sites: expected a callable x -> scores; got {type(fn).__name__}.")
    sites = find_sites(fn, x, input)
    if not sites:
        raise ValueError(
            "attention_sites: the model has no attention block that depends on the input: no softmax over "
            "an axis whose result is contracted with values by a matrix product was found in its "
            "computation. Attention methods (attention_rollout, generic_attention, legrad) need a "
            "transformer; for other models use gcj.grad_cam with a tap."
        )
    return select_sites(sites, attention, "attention_sites")
