"""The ``layers`` command: a model's layer paths (the values ``explain --layer`` takes) — a zoo
model's, or your own model's ``layers`` (``--model MODULE:FACTORY``, see :mod:`.models`)."""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import zoo
from .._tap import as_tap
from .common import EXIT_OK, PROG, UsageError
from .models import UserModel, load_model

__all__ = ["add_parser", "run", "layer_shapes", "user_layer_shapes"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``layers`` to the command's sub-commands; its parsed arguments carry ``func=run``."""
    ly = subparsers.add_parser(
        "layers",
        help="list a model's layer paths (for --layer)",
        description="List the layer paths of a model, in call order, with "
        "their output shapes for an input of the model's size.",
    )
    ly.add_argument(
        "--model",
        default="efficientnet_lite0",
        metavar="NAME|MODULE:FACTORY",
        help="zoo model (default: %(default)s), or MODULE:FACTORY / FILE.py:FACTORY returning your "
        "own model with a `layers` attribute (and tap_at(layer)); see `gradcam-jax explain --help`",
    )
    ly.add_argument(
        "--all",
        action="store_true",
        help="include every submodule (convolutions, batch norms), not only blocks",
    )
    ly.set_defaults(func=run)
    return ly


def run(args: argparse.Namespace) -> int:
    """Print the layer table of ``args.model``; raises :class:`UsageError` for an unknown model
    or one that does not list its layers."""
    model = load_model(args.model)
    if isinstance(model, UserModel):
        layers, shapes, size = _user_layers(model)
    else:
        layers, shapes, size = model.layers, layer_shapes(model), model.input_size
    print(
        f"# {model.name}: layer paths for --layer, with each layer's output shape (H, W, C) "
        f"for a {size} x {size} input"
    )
    for path in layers:
        if not args.all and "/" in path:
            continue
        mark = "   <- default" if path == model.default_layer else ""
        print(f"{path:28s} {str(shapes.get(path, '')):22s}{mark}".rstrip())
    return EXIT_OK


def _user_layers(model: UserModel) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]], int]:
    if model.layers is None:
        raise UsageError(
            f"{model.name} ({model.label}) does not list its layers: give it a `layers` attribute "
            f"(the names its tap_at(layer) takes, in call order) for `{PROG} layers` to show them."
        )
    size = model.input_size or 224
    return model.layers, user_layer_shapes(model, size), size


def layer_shapes(model: zoo.Pretrained) -> dict[str, tuple[int, ...]]:
    """Each submodule path -> its output shape without the batch axis, traced (nothing is computed)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and hasattr(out, "shape"):
            shapes.setdefault("/".join(context.module.path), tuple(out.shape[1:]))
        return out

    def forward(variables, x):
        with nn.intercept_methods(interceptor):
            return model.module.apply(variables, x)

    size = model.input_size
    jax.eval_shape(forward, model.variables, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return shapes


def user_layer_shapes(model: UserModel, size: int) -> dict[str, tuple[int, ...]]:
    """Each layer of your own model -> its tap's activation shape without the batch axis, for one
    ``size`` x ``size`` image, traced (nothing is computed); layers whose tap cannot be traced so
    are left out."""
    x = model.preprocess(np.zeros((size, size, 3), np.uint8))
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in model.layers or ():
        try:
            a = jax.eval_shape(lambda tap, x: as_tap(tap)(x)[1], model.tap_at(layer), x)
        except Exception:  # noqa: BLE001 - any failure of user code: list the layer without a shape
            continue
        shapes[layer] = tuple(a.shape[1:])
    return shapes
