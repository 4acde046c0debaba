"""Explaining transformers: attention sites found by operations, rollout, generic attention, LeGrad.

:func:`attention_sites` lists the attention blocks of any JAX function (from its jaxpr);
:func:`attention_rollout`, :func:`generic_attention` and :func:`legrad` turn their
probabilities (and gradients, from one forward and one backward pass) into maps.
"""

from .methods import AttentionOptions as AttentionOptions
from .methods import attention_rollout as attention_rollout
from .methods import generic_attention as generic_attention
from .methods import legrad as legrad
from .sites import AttentionSite as AttentionSite
from .sites import attention_sites as attention_sites

__all__ = [
    "AttentionSite",
    "AttentionOptions",
    "attention_sites",
    "attention_rollout",
    "generic_attention",
    "legrad",
]
