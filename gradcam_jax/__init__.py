"""gradcam_jax: Grad-CAM and its relatives for any JAX model, as pure jit-compiled functions.

Split a model at a layer with a *tap* (``linen_tap``, ``nnx_tap``, ``equinox_tap``,
``split_tap``), then explain with ``grad_cam`` / ``cam``: one forward pass per batch gives the
activation and its gradient, whatever the number of classes explained.
"""

from . import methods, metrics, perturbation, postprocess, viz, zoo
from ._adapters import equinox_tap, linen_layers, linen_tap, nnx_tap
from ._core import Grads, activations_and_grads
from ._explain import cam, grad_cam
from ._tap import Edit, Tap, as_tap, split_tap
from .perturbation import ablation_cam, occlusion, score_cam
from .dataset import DatasetRun, Results, explain_dataset, open_results
from .guided import (count_relus, deconv_relu, deconv_relu6, deconvnet, deconvolved, gradients,
                     guided, guided_backprop, guided_grad_cam, guided_relu, guided_relu6, smooth_grad)

__version__ = "0.1.0"

__all__ = [
    "Tap", "Edit", "as_tap", "split_tap", "linen_tap", "linen_layers", "nnx_tap", "equinox_tap",
    "activations_and_grads", "Grads", "grad_cam", "cam", "methods", "metrics", "postprocess", "viz", "zoo",
    "perturbation", "score_cam", "ablation_cam", "occlusion",
    "guided_relu", "deconv_relu", "guided_relu6", "deconv_relu6", "guided", "deconvolved",
    "explain_dataset", "open_results", "Results", "DatasetRun",
    "count_relus", "guided_backprop", "deconvnet", "gradients", "smooth_grad", "guided_grad_cam",
]
