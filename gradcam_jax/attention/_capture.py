"""Capturing attention probabilities, their gradients and the residual stream in one pass.

:func:`evaluate` runs the jaxpr of the explained function again, equation by equation, with
*probes*: at an attention site a zero ``delta`` is added to the probabilities (``A + delta``,
the taps' trick: one ``jax.vjp`` with respect to the deltas gives every ``dA`` in one backward
pass) and ``A`` is recorded; at a block output (LeGrad's tokens) the value is recorded and the
rest of the model sees it through ``stop_gradient``, so that the gradient of a score computed
from one layer's tokens reaches that layer's attention only. Sites inside ``scan`` get stacked
deltas (one per iteration) and come back stacked; ``jit``, ``remat`` and custom-derivative calls
holding a probe are inlined (``remat`` kept as ``jax.checkpoint``).

:func:`block_outputs` finds each attention block's output on the residual stream from the
operations alone: the skip connection is the first ``add`` after the site with one operand that
depends on the site and one that does not (the block's input); the stream is followed through
the ``add``\\ s that take it as an operand (the attention and MLP residuals) and stops before
an ``add`` of the next block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._jaxpr import CALLS, REMAT, bind_eqn, closed_parts, depends, is_var, read_env, sub_jaxprs
from .sites import AttentionSite

__all__ = ["Probe", "evaluate", "block_outputs", "canonical", "per_block", "zero_deltas"]

ATTENTION, TOKENS = "attention", "tokens"


@dataclasses.dataclass(frozen=True, order=True)
class Probe:
    """A place in the jaxpr: the ``out``-th output of the equation at ``path``."""

    path: tuple[int, ...]
    out: int
    kind: str  # ATTENTION (delta added, value recorded) or TOKENS (recorded, stop_gradient after)


def _relative(probes, i: int, k: int):
    return [
        dataclasses.replace(p, path=p.path[2:]) for p in probes if len(p.path) > 1 and p.path[:2] == (i, k)
    ]


def _eval(jaxpr, consts, args, probes: Sequence[Probe], deltas: dict) -> tuple[list, dict]:
    env: dict[Any, Any] = {}
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    found: dict[Probe, Any] = {}
    inner_at = {p.path[0] for p in probes if len(p.path) > 1}
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read_env(env, v) for v in eqn.invars]
        inner = i in inner_at
        outs = _eval_inner(eqn, i, invals, probes, deltas, found) if inner else bind_eqn(eqn, invals)
        for p in probes:
            if p.path == (i,):
                value = outs[p.out]
                found[p] = value
                if p.kind == ATTENTION:
                    outs[p.out] = value + deltas[p].astype(value.dtype)
                else:
                    outs[p.out] = jax.lax.stop_gradient(value)
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read_env(env, v) for v in jaxpr.outvars], found


def _eval_inner(eqn, i: int, invals, probes, deltas, found) -> list:
    name = eqn.primitive.name
    subs = sub_jaxprs(eqn)
    if name in CALLS:
        rel = _relative(probes, i, 0)
        sub_deltas = {
            r: deltas[dataclasses.replace(r, path=(i, 0, *r.path))] for r in rel if r.kind == ATTENTION
        }
        body, consts = closed_parts(subs[0])

        def inner(args, ds):
            return _eval(body, consts, args, rel, ds)

        if name in REMAT:
            inner = jax.checkpoint(inner, prevent_cse=eqn.params.get("prevent_cse", True))
        outs, got = inner(list(invals), sub_deltas)
    elif name == "scan":
        outs, got, rel = _eval_scan(eqn, i, invals, probes, deltas)
    else:
        raise NotImplementedError(
            f"attention: an attention block runs inside {name}, which cannot be re-evaluated with probes; "
            f"unroll it (a Python loop or lax.scan over the layers) for explanation."
        )
    for r in rel:
        found[dataclasses.replace(r, path=(i, 0, *r.path))] = got[r]
    return list(outs)


def _eval_scan(eqn, i: int, invals, probes, deltas):
    p = eqn.params
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
    body, body_consts = closed_parts(p["jaxpr"])
    rel = _relative(probes, i, 0)
    stacked = {r: deltas[dataclasses.replace(r, path=(i, 0, *r.path))] for r in rel if r.kind == ATTENTION}

    def step(carry, inputs):
        x, ds = inputs
        outs, got = _eval(body, body_consts, [*consts, *carry, *x], rel, ds)
        return outs[:ncarry], (outs[ncarry:], got)

    carry, (ys, got) = jax.lax.scan(
        step,
        list(init),
        (list(xs), stacked),
        length=p["length"],
        reverse=p["reverse"],
        unroll=p.get("unroll", 1),
    )
    return [*carry, *ys], got, rel


def evaluate(closed, flat_args: Sequence, probes: Sequence[Probe], deltas: dict) -> tuple[list, dict]:
    """Run ``closed`` (a ``ClosedJaxpr``) on ``flat_args`` with ``probes``; returns the flat outputs
    and the recorded values, ``probe -> array`` (stacked over the scans around it)."""
    return _eval(closed.jaxpr, list(closed.consts), list(flat_args), list(probes), deltas)


def zero_deltas(sites: Sequence[AttentionSite]) -> dict[Probe, jax.Array]:
    """One zero delta per jaxpr site, shaped ``(*scan lengths, *raw shape)``."""
    out: dict[Probe, jax.Array] = {}
    for s in sites:
        out.setdefault(Probe(s.path, 0, ATTENTION), jnp.zeros((*s.repeats, *s.raw_shape), jnp.float32))
    return out


def canonical(p, site: AttentionSite):
    """One block's probabilities (raw layout) as ``(B, heads, N_query, N_key)``, float32."""
    b, q, k = site.batch_axis, site.query_axis, site.key_axis
    heads = [d for d in range(p.ndim) if d not in (b, q, k)]
    return jnp.transpose(p, (b, *heads, q, k)).reshape(site.shape).astype(jnp.float32)


def per_block(found: dict, sites: Sequence[AttentionSite], lead: int = 0) -> list:
    """The recorded (or differentiated) probabilities of each block, canonical, in call order.

    ``lead`` leading axes (K targets) are kept in front: ``(*lead, B, heads, N, N)``.
    """
    out = []
    for s in sites:
        stacked = found[Probe(s.path, 0, ATTENTION)]
        one = stacked[(slice(None),) * lead + s.scan_index]
        fn = canonical
        for _ in range(lead):
            fn = jax.vmap(fn, in_axes=(0, None))
        out.append(fn(one, s))
    return out


# --------------------------------------------------------------------------------------------
# The residual stream (LeGrad's tokens)
# --------------------------------------------------------------------------------------------


def _levels(closed, path: tuple[int, ...]) -> list[tuple[Any, int, tuple[int, ...]]]:
    """``(jaxpr, equation index, path prefix)`` from the site's own jaxpr up through the calls
    around it, stopping at the innermost scan body (whose iteration is one block)."""
    jaxpr, steps = closed.jaxpr, path
    prefix: tuple[int, ...] = ()
    levels: list[tuple[Any, int, tuple[int, ...]]] = []
    while True:
        i = steps[0]
        levels.append((jaxpr, i, prefix))
        if len(steps) == 1:
            return levels[::-1]
        eqn = jaxpr.eqns[i]
        if eqn.primitive.name not in CALLS:
            levels = []  # a loop body: its outer equation holds every layer, not one
        jaxpr, _ = closed_parts(sub_jaxprs(eqn)[steps[1]])
        prefix, steps = (*prefix, i, steps[1]), steps[2:]


def _stream_end(jaxpr, e: int, site_eqns: set[int]) -> tuple[int, int] | None:
    """``(equation, output)`` of block ``e``'s output in ``jaxpr`` (see the module docstring)."""
    labels = depends(jaxpr, (), {j: frozenset({j}) for j in site_eqns})
    producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    where = {v: (j, n) for j, eqn in enumerate(jaxpr.eqns) for n, v in enumerate(eqn.outvars)}

    def plain(v, shape):
        return (
            is_var(v)
            and v.aval.shape == shape
            and not (v in producers and producers[v].primitive.name == "broadcast_in_dim")
        )

    stream, start = None, e
    for j in range(e + 1, len(jaxpr.eqns)):
        eqn = jaxpr.eqns[j]
        if eqn.primitive.name != "add" or len(eqn.invars) != 2:
            continue
        a, b = eqn.invars
        la, lb = (labels.get(v, frozenset()) if is_var(v) else frozenset() for v in (a, b))
        if (e in la) != (e in lb):
            skip = b if e in la else a
            if plain(skip, eqn.outvars[0].aval.shape):
                stream, start = skip, j - 1
                break
    if stream is None:
        return None
    end = None
    for j in range(start + 1, len(jaxpr.eqns)):
        eqn = jaxpr.eqns[j]
        if eqn.primitive.name != "add" or stream not in eqn.invars or len(eqn.invars) != 2:
            continue
        other = eqn.invars[1] if eqn.invars[0] is stream else eqn.invars[0]
        later = labels.get(other, frozenset()) if is_var(other) else frozenset()
        if any(s > e for s in later) or eqn.outvars[0].aval.shape != stream.aval.shape:
            break  # the next block's residual (or a reduction): the stream has left block e
        stream, end = eqn.outvars[0], where[eqn.outvars[0]]
    return end


def block_outputs(
    closed, sites: Sequence[AttentionSite], all_paths: Sequence, who: str = "legrad"
) -> list[Probe]:
    """For each jaxpr site (in ``sites``' order, distinct paths), the probe of its block output.
    ``all_paths``: every attention site of the model, chosen or not (a block's stream ends
    before the next block's residual, whichever blocks are explained)."""
    paths = list(dict.fromkeys(all_paths))
    probes = []
    for path in dict.fromkeys(s.path for s in sites):
        for jaxpr, i, prefix in _levels(closed, path):
            n = len(prefix)
            here = {p[n] for p in paths if len(p) > n and p[:n] == prefix}
            end = _stream_end(jaxpr, i, here)
            if end is not None:
                probes.append(Probe((*prefix, end[0]), end[1], TOKENS))
                break
        else:
            raise ValueError(
                f"{who}: cannot find the output of the attention block at {path} on the residual stream "
                f"(x + attention(x), then + mlp(...)): the model does not look like a pre-norm transformer "
                f"block. Explain it with gcj.generic_attention or gcj.attention_rollout instead."
            )
    return probes
