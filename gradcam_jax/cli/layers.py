"""The ``layers`` command: a zoo model's layer paths (the values ``explain --layer`` takes)."""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import zoo
from .common import EXIT_OK, load_zoo_model

__all__ = ["add_parser", "run", "layer_shapes"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``layers`` to the command's sub-commands; its parsed arguments carry ``func=run``."""
    ly = subparsers.add_parser(
        "layers",
        help="list a model's layer paths (for --layer)",
        description="List the layer paths of a zoo model, in call order, with "
        "their output shapes for a 224 x 224 input.",
    )
    ly.add_argument(
        "--model", default="efficientnet_lite0", metavar="NAME", help="zoo model (default: %(default)s)"
    )
    ly.add_argument(
        "--all",
        action="store_true",
        help="include every submodule (convolutions, batch norms), not only blocks",
    )
    ly.set_defaults(func=run)
    return ly


def run(args: argparse.Namespace) -> int:
    """Print the layer table of ``args.model``; raises :class:`UsageError` for an unknown model."""
    model = load_zoo_model(args.model)
    shapes = layer_shapes(model)
    print(
        f"# {model.name}: layer paths for --layer, with each layer's output shape (H, W, C) "
        f"for a {model.input_size} x {model.input_size} input"
    )
    for path in model.layers:
        if not args.all and "/" in path:
            continue
        mark = "   <- default" if path == model.default_layer else ""
        print(f"{path:28s} {str(shapes.get(path, '')):22s}{mark}".rstrip())
    return EXIT_OK


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
