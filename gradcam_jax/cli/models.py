"""``--model``: a zoo model's name, or your own model from ``MODULE:FACTORY`` / ``FILE.py:FACTORY``.

The factory is called with no arguments and returns an :class:`ExplainableModel` — the same
kind of object as ``gcj.zoo.efficientnet_lite0()``. For example, in ``mymodels.py``::

    class Classifier:
        def __init__(self, module, variables, names):
            self.module, self.variables, self.class_names = module, variables, names
            self.tap = self.tap_at("stage4")  # the default layer
            self.input_size = 224

        def preprocess(self, images):  # uint8 (H, W, 3) or (B, H, W, 3) -> (B, 224, 224, 3)
            x = jnp.asarray(images, jnp.float32)
            x = x[None] if x.ndim == 3 else x
            x = jax.image.resize(x, (x.shape[0], 224, 224, 3), "bilinear")
            return (x - 127.5) / 127.5

        def logits(self, x):
            return self.module.apply(self.variables, x)

        def tap_at(self, layer):
            return gcj.linen_tap(self.module, self.variables, layer)

    def factory():
        return Classifier(...)

and then ``gradcam-jax explain photo.jpg --model mymodels:factory``. :func:`load_model` is the
one loader of ``explain``, ``explain-dir`` and ``layers``; :class:`UserModel` gives a checked
object the zoo models' interface (probabilities from logits, class lookup, ``--layer``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from .. import zoo
from .._tap import Tap
from .common import PROG, UsageError, load_zoo_model

__all__ = [
    "ExplainableModel",
    "LayeredModel",
    "UserModel",
    "Model",
    "load_model",
    "import_module",
    "check_model",
    "layer_tap",
    "class_count",
    "MEMBERS",
    "REQUIRED",
]

#: What a model offers, each with the short description messages show. ``logits`` and ``probs``
#: are alternatives (one is required); the rest are optional.
MEMBERS = {
    "preprocess": "preprocess(images) -> model input",
    "tap": "tap: the model split at its default layer (a gcj.Tap)",
    "logits": "logits(x) -> (B, num_classes) scores (or probs(x))",
    "probs": "probs(x) -> (B, num_classes) probabilities (or logits(x))",
    "class_names": "class_names: one name per class, or None",
    "tap_at": "tap_at(layer) -> a tap at another layer (for --layer)",
    "layers": "layers: the layer names tap_at takes, in call order",
    "default_layer": "default_layer: the name of tap's layer",
    "input_size": "input_size: the side of the square input (pixels)",
    "name": "name: a label for figures and results",
    "attention_head": "attention_head(tokens) -> scores: final norm + classifier (for --methods legrad)",
    "drop_tokens": "drop_tokens: leading tokens that are not patches (attention methods; default 1)",
}
#: The members a model must have (``logits`` standing for ``logits`` or ``probs``).
REQUIRED = ("preprocess", "tap", "logits", "class_names")


@runtime_checkable
class ExplainableModel(Protocol):
    """What ``--model MODULE:FACTORY`` returns: an image classifier the commands can explain.

    ``gcj.zoo.efficientnet_lite0()`` is one. Required:

    - ``preprocess(images)``: ``uint8`` RGB images, one ``(H, W, 3)`` or a batch
      ``(B, H, W, 3)`` of any size -> the model's input batch ``(B, ...)``, resized and
      normalised as the model expects (a single image gives a batch of one). ``explain-dir``
      calls it inside ``jax.jit`` on batches already resized to ``input_size`` (or ``--size``),
      so there it must be traceable (``jax.numpy``, no NumPy or PIL).
    - ``tap``: the model split at its default layer — a :class:`gradcam_jax.Tap`
      (``gcj.linen_tap``, ``nnx_tap``, ``equinox_tap``, ``split_tap``) or a callable
      ``tap(x, delta) -> (scores, activation)``.
    - ``logits(x)``: the scores ``(B, num_classes)`` of a preprocessed batch; or, instead,
      ``probs(x)``: the probabilities (figures and ``results.json`` show probabilities; a model
      with only ``logits`` gets their softmax).
    - ``class_names``: one name per class, or ``None`` (classes are then shown as indices).

    Optional: ``tap_at(layer)`` (a tap at another layer; needed for ``--layer``), ``layers``
    (the names ``tap_at`` takes, in call order; for ``gradcam-jax layers`` and for checking
    ``--layer``; see :class:`LayeredModel`), ``default_layer`` (the name of ``tap``'s layer),
    ``input_size`` (the side ``explain-dir`` resizes images to unless ``--size`` is given) and
    ``name`` (default: the factory's name).
    """

    @property
    def tap(self) -> Any: ...

    @property
    def class_names(self) -> Sequence[str] | None: ...

    def preprocess(self, images: Any) -> Any: ...

    def logits(self, x: Any) -> Any: ...


@runtime_checkable
class LayeredModel(ExplainableModel, Protocol):
    """An :class:`ExplainableModel` that can be explained at any of its layers (``--layer``)."""

    @property
    def layers(self) -> Sequence[str]: ...

    def tap_at(self, layer: str) -> Any: ...


class UserModel:
    """A model from ``--model MODULE:FACTORY``, checked (:func:`check_model`), with the zoo
    models' interface: ``probs``, ``class_index``, ``tap_at`` that explains what is missing."""

    def __init__(self, model: Any, label: str):
        self.model = model
        self.label = label
        self.name = str(getattr(model, "name", None) or label.rpartition(":")[2])
        names = model.class_names
        self.class_names = None if names is None else tuple(str(n) for n in names)
        size = getattr(model, "input_size", None)
        self.input_size = None if size is None else int(size)
        self.tap = model.tap
        layer = getattr(model, "default_layer", None) or getattr(self.tap, "name", None)
        self.default_layer = str(layer or "default")

    def __repr__(self) -> str:
        return f"UserModel({self.label!r}: {type(self.model).__name__})"

    def preprocess(self, images: Any) -> Any:
        """The model's ``preprocess``; a list of images (of any sizes) is preprocessed one by one."""
        if isinstance(images, (list, tuple)):
            return jnp.concatenate([jnp.asarray(self.model.preprocess(im)) for im in images], axis=0)
        return self.model.preprocess(images)

    def probs(self, x: Any) -> jax.Array:
        """The model's ``probs(x)``, or the softmax of its ``logits(x)``."""
        if callable(getattr(self.model, "probs", None)):
            return jnp.asarray(self.model.probs(x))
        return jax.nn.softmax(jnp.asarray(self.model.logits(x)), axis=-1)

    @functools.cached_property
    def num_classes(self) -> int:
        """``len(class_names)``, or the width of the model's output on one blank image."""
        if self.class_names is not None:
            return len(self.class_names)
        side = self.input_size or 224
        return int(np.shape(self.probs(self.preprocess(np.zeros((side, side, 3), np.uint8))))[-1])

    def class_index(self, name: str) -> int:
        """The index of a class by its exact name (case-insensitive)."""
        if self.class_names is None:
            raise ValueError(f"{name!r} is not a class index, and {self.name} has no class_names.")
        return zoo.find_class(self.class_names, name, self.name)

    @functools.cached_property
    def layers(self) -> tuple[str, ...] | None:
        """The model's ``layers`` (an attribute, or a method called without arguments); ``None``
        when it has none."""
        layers = getattr(self.model, "layers", None)
        if callable(layers):
            layers = layers()
        return None if layers is None else tuple(str(name) for name in layers)

    def tap_at(self, layer: str) -> Any:
        """The model's ``tap_at(layer)``; a :class:`UsageError` when it has none or refuses ``layer``."""
        if layer == self.default_layer:
            return self.tap
        tap_at = getattr(self.model, "tap_at", None)
        if not callable(tap_at):
            raise UsageError(
                f"--layer {layer!r}: {self.name} ({self.label}) has no tap_at(layer) method, so it "
                f"can be explained only at its default layer; drop --layer, or give the model "
                f"tap_at(layer) -> tap."
            )
        try:
            return tap_at(layer)
        except (ValueError, LookupError) as e:
            raise UsageError(f"--layer {layer!r}: {self.name}'s tap_at refused it: {e}") from None


#: What ``--model`` gives: a zoo model, or your own (checked).
Model = zoo.Pretrained | UserModel


def import_module(name: str) -> ModuleType:
    """A module by dotted name (importable from ``sys.path`` or the current folder), or the
    Python file at ``name`` (a path ending in ``.py``; its folder is added to ``sys.path``, so
    it can import its neighbours)."""
    if not (name.endswith(".py") or os.sep in name or "/" in name):
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        return importlib.import_module(name)
    path = Path(name).resolve()
    known = sys.modules.get(path.stem)
    if known is not None and getattr(known, "__file__", None) and Path(str(known.__file__)).resolve() == path:
        return known
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name}")
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    module = importlib.util.module_from_spec(spec)
    register = path.stem not in sys.modules  # as an import would (dataclasses look it up there)
    if register:
        sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if register:
            del sys.modules[path.stem]
        raise
    return module


def _call_factory(spec: str) -> Any:
    module_name, _, attr = spec.rpartition(":")
    try:
        module = import_module(module_name)
    except (ImportError, OSError) as e:
        raise UsageError(f"--model {spec!r}: cannot import {module_name!r} ({e}).") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise UsageError(f"--model {spec!r}: {module_name!r} has no {attr!r}.")
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: {attr!r} is not a function returning a model.")
    return factory()


def _is_bare_tap(obj: Any) -> bool:
    """A tap rather than a model: a :class:`Tap`, or a callable with none of a model's members."""
    return isinstance(obj, Tap) or (callable(obj) and not any(hasattr(obj, m) for m in MEMBERS))


def check_model(obj: Any, spec: str) -> UserModel:
    """``obj`` as a :class:`UserModel`, or a :class:`UsageError` naming what it lacks."""
    has_scores = hasattr(obj, "logits") or hasattr(obj, "probs")
    missing = [m for m in REQUIRED if not (has_scores if m == "logits" else hasattr(obj, m))]
    kind = type(obj).__name__
    if missing:
        lacks = "; ".join(MEMBERS[m] for m in missing)
        raise UsageError(
            f"--model {spec!r} returned a {kind} that lacks {', '.join(missing)} ({lacks}). A model "
            f"needs preprocess, tap, logits (or probs) and class_names: see "
            f"gradcam_jax.cli.models.ExplainableModel."
        )
    not_callable = [m for m in ("preprocess", "logits", "probs", "tap_at") if _not_callable(obj, m)]
    if not callable(obj.tap):
        not_callable.insert(0, "tap")
    if not_callable:
        raise UsageError(
            f"--model {spec!r} returned a {kind} whose {', '.join(not_callable)} should be callable: "
            + "; ".join(MEMBERS[m] for m in not_callable)
            + "."
        )
    names = obj.class_names
    if names is not None and (isinstance(names, (str, bytes)) or not isinstance(names, Sequence)):
        got = type(names).__name__
        raise UsageError(f"--model {spec!r}: class_names should be a sequence of names or None; got {got}.")
    return UserModel(obj, spec)


def _not_callable(obj: Any, member: str) -> bool:
    return hasattr(obj, member) and not callable(getattr(obj, member))


def load_model(spec: str, *, taps: bool = False) -> zoo.Pretrained | UserModel | Any:
    """``--model``: a zoo model by name, or ``MODULE:FACTORY`` / ``FILE.py:FACTORY`` called with
    no arguments and returning an :class:`ExplainableModel` (a zoo model is kept as it is).

    With ``taps=True`` (``explain-dir``) the factory may also return a bare tap (returned as it
    is). Problems are :class:`UsageError`\\ s that name what is missing.
    """
    if ":" not in spec:
        return load_zoo_model(spec, prefix="--model: ")
    obj = _call_factory(spec)
    if isinstance(obj, zoo.Pretrained):
        return obj
    if _is_bare_tap(obj):
        if taps:
            return obj
        raise UsageError(
            f"--model {spec!r} returned a tap; this command needs a whole model "
            f"(preprocess, tap, logits and class_names: see gradcam_jax.cli.models.ExplainableModel). "
            f"`{PROG} explain-dir` also takes a bare tap."
        )
    return check_model(obj, spec)


def layer_tap(model: Model, spec: str | None) -> tuple[str, Any]:
    """``--layer``: the layer's name and the model's tap there (default: the model's own tap)."""
    layer = (spec or model.default_layer).strip("/")
    if layer == model.default_layer:
        return layer, model.tap
    layers = model.layers
    if layers is not None and layer not in layers:
        shown = ", ".join(p for p in layers if "/" not in p)
        raise UsageError(
            f"--layer {layer!r} is not a layer of {model.name}. Top-level layers: {shown}. "
            f"`{PROG} layers --all` lists every submodule."
        )
    return layer, model.tap_at(layer)


def class_count(model: Model) -> int:
    """How many classes the model scores."""
    if isinstance(model, UserModel):
        return model.num_classes
    return len(model.class_names)
