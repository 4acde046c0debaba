"""Attributions beyond CAM: path methods, a noise tunnel, relevance rules, sampling methods, XRAI.

Every explainer here takes a model called as ``x -> scores`` (any JAX callable, a tap) and
returns attributions in the input's pixels; targets, pytree inputs and layouts as for
:func:`gradcam_jax.grad_cam`.
"""

from . import rules as rules
from .noise import noise_tunnel as noise_tunnel
from .pair_paths import blur_ig as blur_ig
from .pair_paths import guided_ig as guided_ig
from .path import expected_gradients as expected_gradients
from .path import input_x_gradient as input_x_gradient
from .path import integrated_gradients as integrated_gradients
from .relevance import deeplift as deeplift
from .relevance import lrp as lrp
from .sampling import kernel_shap as kernel_shap
from .sampling import rise as rise
from .xrai import xrai as xrai

__all__ = [
    "integrated_gradients",
    "expected_gradients",
    "input_x_gradient",
    "noise_tunnel",
    "lrp",
    "deeplift",
    "rules",
    "blur_ig",
    "guided_ig",
    "xrai",
    "rise",
    "kernel_shap",
]
