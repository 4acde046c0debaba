"""Pieces the metrics share: the input's image and its layout, argument checks, targets under jit.

The metrics read the model's input as the explainers do (:func:`gradcam_jax._inputs.input_view`):
one array — images ``(B, H, W, C)``, signals ``(B, T, C)``, volumes or videos
``(B, D, H, W, C)``, channels-first with ``layout=`` — or a pytree whose image ``input=`` picks.
Inside a kernel the image is handled channels-last (``image_of``) and put back into the input,
in its own layout, before each forward (``with_image``); the other leaves of a pytree input are
taken example by example with it (:func:`examples`). All functions are pure and jittable.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._chunking import map_in_chunks
from .._inputs import InputView, check_batch, image_leaf, input_gate
from .._layout import Layout, parse_layout, to_channels_last
from .._tap import scores_fn
from .._targets import check_target_against, int32_indices, take_classes, target_spec

__all__ = [
    "RemovalOptions",
    "SPATIAL_AXES",
    "check_fn",
    "check_inputs",
    "check_maps",
    "check_map_batch",
    "nan_examples",
    "check_positive_int",
    "broadcast_fill",
    "examples",
    "map_shape",
    "prepare_target",
    "class_scores",
    "resolve_target",
]

#: The names of the spatial axes of each spatial rank, as the messages write them.
SPATIAL_AXES = {1: "T", 2: "H, W", 3: "D, H, W"}

#: The input the metrics assume when none is described: one channels-last image batch.
DEFAULT_VIEW = InputView(0, parse_layout("NHWC"))


@dataclasses.dataclass(frozen=True)
class RemovalOptions:
    """The static options of the removal-metric kernels (one ``options`` argument each).

    ``view``: where the image is in the model's input and its layout (shapes only).
    """

    chunk: int
    softmax: bool
    n_steps: int = 0
    counts: tuple[int, ...] = ()
    view: InputView = DEFAULT_VIEW


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def check_fn(fn, who: str):
    if not callable(fn):
        raise TypeError(
            f"{who}: fn must be a callable images -> scores (B, classes) (a model's apply "
            f"closure, an Equinox model, a tap); got {type(fn).__name__}."
        )


def check_inputs(
    x, layout: str | Layout | None, input: Any, who: str, ranks=(1, 2, 3), why: str | None = None
) -> InputView:
    """The image of the model's input ``x`` (see the module docstring), through the explainers'
    input gate (:func:`~gradcam_jax._inputs.input_gate`): a non-empty floating batch with a
    spatial rank in ``ranks``; ``why`` says why a rank is refused (default: it has no spatial axes)."""
    return input_gate(x, layout, input, who, arg="images", ranks=tuple(ranks), why=why)


def check_map_batch(maps, who: str, arg: str = "maps"):
    """``maps`` as an array, refused when its batch is empty (as every metric does)."""
    maps = jnp.asarray(maps)
    check_batch(maps, who, arg)
    return maps


def nan_examples(maps):
    """``(B,)`` bool: the examples whose map holds a NaN (their metrics are NaN, not a number)."""
    return jnp.any(jnp.isnan(maps.reshape(maps.shape[0], -1)), axis=-1)


def map_shape(x, view: InputView) -> tuple[int, ...]:
    """The shape of the input's maps: ``(B, *spatial)``."""
    shape = tuple(image_leaf(x, view).shape)
    return (shape[0], *view.layout.spatial_shape(shape))


def check_maps(maps, x, view: InputView, who: str):
    """Maps must be ``(B, *spatial)`` at the resolution of the input's image."""
    want = map_shape(x, view)
    axes = SPATIAL_AXES[view.spatial_rank]
    if not hasattr(maps, "ndim") or maps.ndim != len(want):
        shape = getattr(maps, "shape", type(maps).__name__)
        hint = (
            f" Collapse a per-channel attribution (B, {axes}, C), e.g. Guided Backprop's, with "
            f"metrics.pixel_saliency (layout= for channels-first ones)."
            if getattr(maps, "ndim", 0) == len(want) + 1
            else ""
        )
        raise ValueError(f"{who}: maps must be (B, {axes}); got {shape}.{hint}")
    if tuple(maps.shape) != want:
        raise ValueError(
            f"{who}: maps {tuple(maps.shape)} do not match the images' (B, {axes}) = "
            f"{want}. Compute the maps with upsample=True (or resize them with "
            f"gradcam_jax.postprocess.upsample_to)."
        )


def check_positive_int(value, name: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{who}: {name} must be a positive int; got {value!r}.")
    return int(value)


def broadcast_fill(value, x, view: InputView, who: str):
    """``value`` (a number, or an array broadcastable to the image *in its own layout*) as a
    channels-last image ``(B, *spatial, C)`` of the image's dtype."""
    image = image_leaf(x, view)
    v = jnp.asarray(value, image.dtype)
    try:
        full = jnp.broadcast_to(v, image.shape)
    except ValueError:
        raise ValueError(
            f"{who}: the fill of shape {v.shape} does not broadcast to the images {tuple(image.shape)}."
        ) from None
    return to_channels_last(full, view.layout)


def examples(x, idx):
    """Examples ``idx`` of the input ``x``: every leaf indexed along its first (batch) axis."""
    return jax.tree_util.tree_map(lambda v: v[idx], x)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def _one_example(v):
    dtype = v.dtype if hasattr(v, "dtype") else jnp.result_type(v)
    return jax.ShapeDtypeStruct((1,) + tuple(jnp.shape(v)[1:]), dtype)


def prepare_target(fn, x, batch: int, target, who: str):
    """``None`` stays None (resolved under jit to the top class of the clean input); an int or
    an int array ``(B,)`` becomes an int32 array ``(B,)``, range-checked when concrete."""
    if target is None:
        return None
    if isinstance(target, (list, tuple)):
        target = np.asarray(target)  # here a list is one class per image, not K classes
    spec = target_spec(target, batch)  # the explainers' own target rules and messages
    if spec.kind != "index":
        raise ValueError(
            f"{who}: target must be None, an int or an int array of shape ({batch},); got {target!r}."
        )
    scores = scores_fn(fn)
    one = jax.tree_util.tree_map(_one_example, x)
    check_target_against(spec, lambda: jax.eval_shape(scores, one), who=who)
    value = spec.value
    return jnp.asarray(int32_indices(value) if isinstance(value, np.ndarray) else value, jnp.int32)


def class_scores(scores, target, softmax: bool):
    """``scores (N, classes)`` -> the target class's probability (``softmax``) or score ``(N,)``."""
    scores = scores.astype(jnp.float32)
    if scores.ndim != 2:
        raise ValueError(
            f"The scores function must return (batch, classes); it returned shape {scores.shape}."
        )
    if softmax:
        scores = jax.nn.softmax(scores, axis=-1)
    return take_classes(scores, target[:, None])[:, 0]  # NaN for a traced out-of-range target


def resolve_target(fn, x, target, chunk: int, batch: int):
    """The target under jit: ``None`` -> argmax of the clean scores (chunked forwards)."""
    if target is not None:
        return target
    return map_in_chunks(
        lambda idx: jnp.argmax(fn(examples(x, idx)), axis=-1).astype(jnp.int32), batch, chunk
    )
