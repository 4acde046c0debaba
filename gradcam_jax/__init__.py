"""gradcam_jax: Grad-CAM and its relatives for any JAX model, as pure jit-compiled functions.

Split a model at a layer with a *tap* (``linen_tap``, ``nnx_tap``, ``equinox_tap``,
``split_tap``), then explain with ``grad_cam`` / ``cam``: one forward pass per batch gives the
activation and its gradient, whatever the number of classes explained.

This module only re-exports; ``ARCHITECTURE.md`` in the repository maps the modules.
"""

from . import attribution as attribution
from . import losses as losses
from . import methods as methods
from . import metrics as metrics
from . import perturbation as perturbation
from . import postprocess as postprocess
from . import targets as targets
from . import viz as viz
from . import zoo as zoo
from ._adapters import equinox_layers as equinox_layers
from ._adapters import equinox_tap as equinox_tap
from ._adapters import linen_layers as linen_layers
from ._adapters import linen_tap as linen_tap
from ._cam import METHODS as METHODS
from ._cam import cam as cam
from ._cam import grad_cam as grad_cam
from ._cam import method_names as method_names
from ._cam import register_method as register_method
from ._grads import Grads as Grads
from ._grads import activations_and_grads as activations_and_grads
from ._haiku import haiku_layers as haiku_layers
from ._haiku import haiku_tap as haiku_tap
from ._hf import hf_layers as hf_layers
from ._hf import hf_tap as hf_tap
from ._keras import keras_layers as keras_layers
from ._keras import keras_tap as keras_tap
from ._layerset import marked_layers as marked_layers
from ._layerset import marked_tap as marked_tap
from ._maps import MapOptions as MapOptions
from ._nnx import nnx_layers as nnx_layers
from ._nnx import nnx_tap as nnx_tap
from ._tap import Edit as Edit
from ._tap import Tap as Tap
from ._tap import as_tap as as_tap
from ._tap import split_tap as split_tap
from ._targets import TargetSpec as TargetSpec
from ._targets import target_spec as target_spec
from ._version import __version__ as __version__
from .attention import AttentionSite as AttentionSite
from .attention import attention_rollout as attention_rollout
from .attention import attention_sites as attention_sites
from .attention import generic_attention as generic_attention
from .attention import legrad as legrad
from .attribution import blur_ig as blur_ig
from .attribution import deeplift as deeplift
from .attribution import expected_gradients as expected_gradients
from .attribution import guided_ig as guided_ig
from .attribution import input_x_gradient as input_x_gradient
from .attribution import integrated_gradients as integrated_gradients
from .attribution import kernel_shap as kernel_shap
from .attribution import lrp as lrp
from .attribution import noise_tunnel as noise_tunnel
from .attribution import rise as rise
from .attribution import xrai as xrai
from .cams import finer_cam as finer_cam
from .cams import random_cam as random_cam
from .cams import shapley_cam as shapley_cam
from .dataset import DatasetRun as DatasetRun
from .dataset import Results as Results
from .dataset import explain_dataset as explain_dataset
from .dataset import open_results as open_results
from .dff import DeepFeatures as DeepFeatures
from .dff import deep_feature_factorization as deep_feature_factorization
from .fullgrad import fullgrad as fullgrad
from .fullgrad import linen_biases as linen_biases
from .guided import count_relus as count_relus
from .guided import deconv_relu as deconv_relu
from .guided import deconv_relu6 as deconv_relu6
from .guided import deconvnet as deconvnet
from .guided import deconvolved as deconvolved
from .guided import gradients as gradients
from .guided import guided as guided
from .guided import guided_backprop as guided_backprop
from .guided import guided_grad_cam as guided_grad_cam
from .guided import guided_relu as guided_relu
from .guided import guided_relu6 as guided_relu6
from .guided import smooth_grad as smooth_grad
from .perturbation import ablation_cam as ablation_cam
from .perturbation import occlusion as occlusion
from .perturbation import score_cam as score_cam
from .score_variants import is_cam as is_cam
from .score_variants import ss_cam as ss_cam

__all__ = [
    "Tap",
    "Edit",
    "as_tap",
    "split_tap",
    "marked_tap",
    "marked_layers",
    "haiku_tap",
    "haiku_layers",
    "keras_tap",
    "keras_layers",
    "hf_tap",
    "hf_layers",
    "nnx_layers",
    "linen_tap",
    "linen_layers",
    "nnx_tap",
    "equinox_tap",
    "equinox_layers",
    "activations_and_grads",
    "Grads",
    "TargetSpec",
    "target_spec",
    "MapOptions",
    "grad_cam",
    "cam",
    "METHODS",
    "method_names",
    "register_method",
    "methods",
    "metrics",
    "postprocess",
    "viz",
    "zoo",
    "targets",
    "losses",
    "perturbation",
    "score_cam",
    "ablation_cam",
    "ss_cam",
    "is_cam",
    "shapley_cam",
    "finer_cam",
    "random_cam",
    "deep_feature_factorization",
    "DeepFeatures",
    "fullgrad",
    "linen_biases",
    "occlusion",
    "guided_relu",
    "deconv_relu",
    "guided_relu6",
    "deconv_relu6",
    "guided",
    "deconvolved",
    "explain_dataset",
    "open_results",
    "Results",
    "DatasetRun",
    "count_relus",
    "guided_backprop",
    "deconvnet",
    "gradients",
    "smooth_grad",
    "guided_grad_cam",
    "AttentionSite",
    "attention_sites",
    "attention_rollout",
    "generic_attention",
    "legrad",
    "attribution",
    "integrated_gradients",
    "expected_gradients",
    "input_x_gradient",
    "noise_tunnel",
    "lrp",
    "deeplift",
    "blur_ig",
    "guided_ig",
    "xrai",
    "rise",
    "kernel_shap",
]
