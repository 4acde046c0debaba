"""The attention methods' formulas, from per-block probabilities ``A`` and gradients ``dA``.

Each block's ``A`` and ``dA`` are ``(B, heads, N, N)`` (query rows, key columns), listed in
call order (the first block first). Each formula returns a relevance per token, ``(B, N)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["HEAD_FUSIONS", "fuse_heads", "discard_lowest", "rollout", "generic_relevance", "legrad_relevance"]

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(a, how: str):
    """``(B, heads, N, N) -> (B, N, N)``: the mean, max or min over heads."""
    if how == "max":
        return jnp.max(a, axis=1)
    return jnp.min(a, axis=1) if how == "min" else jnp.mean(a, axis=1)


def discard_lowest(a, ratio: float, token: int):
    """Zero the ``int(ratio * N * N)`` smallest entries of each ``(N, N)`` map (ties: the first
    in row-major order), never the read-out token's own entry ``[token, token]``."""
    b, n, _ = a.shape
    k = int(ratio * n * n)
    if k == 0:
        return a
    flat = a.reshape(b, n * n)
    _, lowest = jax.lax.top_k(-flat, k)
    drop = jnp.zeros((b, n * n), bool).at[jnp.arange(b)[:, None], lowest].set(True)
    drop = drop.at[:, token * n + token].set(False)
    return jnp.where(drop, 0.0, flat).reshape(a.shape)


def rollout(attentions: Sequence, head_fusion: str = "mean", discard_ratio: float = 0.0, token: int = 0):
    """Attention rollout (Abnar & Zuidema 2020): ``R = Â_L ··· Â_1`` with
    ``Â = rownorm(0.5 · fuse_heads(A) + 0.5 · I)``; returns row ``token`` of ``R``, ``(B, N)``."""
    r: Any = None
    for a in attentions:
        fused = discard_lowest(fuse_heads(a, head_fusion), discard_ratio, token)
        n = fused.shape[-1]
        fused = 0.5 * fused + 0.5 * jnp.eye(n, dtype=fused.dtype)
        fused = fused / jnp.sum(fused, axis=-1, keepdims=True)
        r = fused if r is None else fused @ r
    return r[:, token, :]


def generic_relevance(attentions: Sequence, grads: Sequence, token: int = 0):
    """Chefer, Gur & Wolf (ICCV 2021), self-attention rule: ``R = I``, then per block
    ``R ← R + mean_h((dA ⊙ A)⁺) · R``; returns row ``token`` of ``R``, ``(B, N)``."""
    n = attentions[0].shape[-1]
    r = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (attentions[0].shape[0], n, n))
    for a, g in zip(attentions, grads, strict=True):
        cam = jnp.mean(jax.nn.relu(g * a), axis=1)
        r = r + cam @ r
    return r[:, token, :]


def legrad_relevance(grads: Sequence):
    """LeGrad (Bousselham et al. 2024): ``mean_l mean_h mean_query (dA_l)⁺``, ``(B, N)``, where
    ``dA_l`` is the gradient of the score read from layer ``l``'s tokens w.r.t. its attention."""
    per_layer = [jnp.mean(jax.nn.relu(g), axis=(1, 2)) for g in grads]
    return sum(per_layer[1:], per_layer[0]) / len(per_layer)
