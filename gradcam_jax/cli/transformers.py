"""``explain`` for vision transformers: maps from the model's attention (``--methods
attention_rollout,generic_attention,legrad``).

These methods explain the whole model's scores (its ``logits``, or ``probs``), not a tap: a
``--model`` factory's model needs attention blocks (:func:`gradcam_jax.attention_sites` finds
them) and, for ``legrad``, ``attention_head(tokens) -> scores`` — its final norm and classifier
applied to a block's tokens ``(B, N, D)``. ``drop_tokens`` (default 1: a class token) says how
many leading tokens are not image patches. The other methods of the run (Grad-CAM on a token
tap, say) are checked and computed as always.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..attention import attention_rollout, attention_sites, generic_attention, legrad
from .common import UsageError, parse_methods
from .explain_job import METHODS, Job, job_from_args
from .models import Model, UserModel

__all__ = ["ATTENTION_METHODS", "attention_job", "attention_maps", "model_scores"]

#: Transformer methods, computed from the model's attention (``--model`` with attention blocks):
#: the whole model's scores ``logits(x)`` are explained, not a tap. LeGrad also needs the model's
#: ``attention_head(tokens) -> scores`` (its final norm and classifier); ``drop_tokens`` (default 1,
#: a class token) says how many leading tokens are not patches.
ATTENTION_METHODS = ("attention_rollout", "generic_attention", "legrad")


def model_scores(model: Model):
    """``x -> scores`` of a command's model: its ``logits`` (or ``probs``)."""
    inner = model.model if isinstance(model, UserModel) else model
    return getattr(inner, "logits", None) or inner.probs


def _attention_options(model: Model) -> dict:
    inner = model.model if isinstance(model, UserModel) else model
    return {"drop_tokens": int(getattr(inner, "drop_tokens", 1))}


def attention_maps(model: Model, name: str, x, t):
    """One transformer method's maps ``(B, K, H, W)`` for targets ``t`` ``(B, K)``."""
    fn = model_scores(model)
    if name == "attention_rollout":  # class-agnostic: the same map on every row
        maps = attention_rollout(fn, x, **_attention_options(model))
        return jnp.broadcast_to(maps[:, None], (maps.shape[0], t.shape[1], *maps.shape[1:]))
    if name == "generic_attention":
        return generic_attention(fn, x, t, **_attention_options(model))
    inner: Any = model.model if isinstance(model, UserModel) else model
    return legrad(fn, x, t, head=inner.attention_head, **_attention_options(model))


def attention_job(args: argparse.Namespace) -> Job:
    """:func:`~.explain_job.job_from_args`, with the transformer methods (:data:`ATTENTION_METHODS`)
    allowed in ``--methods``: the other methods are checked there, these against the model here
    (it must have attention blocks; ``legrad`` needs its ``attention_head``)."""
    names = list(dict.fromkeys(parse_methods(args.methods, (*METHODS, *ATTENTION_METHODS))))
    wanted = [n for n in names if n in ATTENTION_METHODS]
    if not wanted:
        return job_from_args(args)
    others = [n for n in names if n not in ATTENTION_METHODS] or ["grad_cam"]  # checked, then replaced
    job = job_from_args(argparse.Namespace(**{**vars(args), "methods": ",".join(others)}))
    side = job.model.input_size or 224
    x = job.model.preprocess(np.zeros((side, side, 3), np.uint8))
    try:
        attention_sites(model_scores(job.model), x)
    except ValueError as e:
        raise UsageError(f"--methods {','.join(wanted)}: {job.model.name}: {e}") from None
    inner = job.model.model if isinstance(job.model, UserModel) else job.model
    if "legrad" in wanted and not callable(getattr(inner, "attention_head", None)):
        raise UsageError(
            f"--methods legrad: {job.model.name} has no attention_head(tokens) -> scores (its final norm and "
            f"classifier applied to a block's tokens, (B, N, D)); give the model one, or drop legrad."
        )
    return dataclasses.replace(job, methods=names)
