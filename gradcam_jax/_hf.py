"""Adapter: build a :class:`~gradcam_jax.Tap` from a Hugging Face Flax model.

A Flax model of ``transformers`` (``FlaxResNetForImageClassification``,
``FlaxViTForImageClassification``, ``FlaxCLIPModel``, ...) is a wrapper around a Linen module
(``model.module``) and its variables (``model.params``). The tap is :func:`linen_tap` over that
module, with what the wrapper's ``__call__`` does done the same way:

- the variables are nested as the module needs them: ``model.params`` as is when it already
  holds the collections (``{"params": ..., "batch_stats": ...}`` for ResNet-style models),
  ``{"params": model.params}`` for a bare parameter dict (ViT, CLIP);
- ``pixel_values`` are channels-first ``(B, C, H, W)``, as Hugging Face image processors
  produce them, and are transposed to the ``(B, H, W, C)`` the module computes in, as the
  wrapper does; the module runs in inference mode (``deterministic=True`` / ``train=False``);
- the scores are the output's ``.logits`` unless ``output=`` says otherwise.

Hugging Face's Flax vision modules compute channels-last throughout (only their
``hidden_states`` outputs are transposed back to channels-first), so tapped convolution
activations are ``(B, h, w, C)`` and transformer ones are tokens ``(B, N, D)``: no
``activation_layout`` is needed. Flax and ``transformers`` are imported lazily (``transformers``
not at all), so ``import gradcam_jax`` needs neither.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from ._adapters import linen_layers, linen_tap
from ._callables import KeyedFunction, hashable
from ._layout import Layout
from ._tap import Tap

__all__ = ["hf_tap", "hf_layers"]


@dataclasses.dataclass(frozen=True)
class _PixelCall:
    """``method=`` for ``module.apply``: the module called on the tap's input as its images.

    A frozen dataclass, so two taps built alike compare equal and share compiled kernels.
    """

    channels_first: bool  # the tap's input is (B, C, H, W): transpose it as the HF wrapper does
    keyword: str | None  # "pixel_values", or None: the module's first positional argument

    def __call__(self, module, x, **kwargs):
        if self.channels_first:
            if x.ndim != 4:
                raise ValueError(
                    f"hf_tap: with pixel_layout='NCHW' the input must be (B, C, H, W); got shape {x.shape}."
                )
            x = jnp.transpose(x, (0, 2, 3, 1))
        kwargs = _text_defaults(module, kwargs)
        return module(**{self.keyword: x}, **kwargs) if self.keyword else module(x, **kwargs)


def _call_parameters(module) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(type(module).__call__).parameters


def _text_defaults(module, kwargs: dict) -> dict:
    """``attention_mask`` and ``position_ids`` for bound ``input_ids``, as the HF wrappers fill them."""
    ids = kwargs.get("input_ids")
    if ids is None:
        return kwargs
    names = _call_parameters(module)
    kwargs = dict(kwargs)
    if "attention_mask" in names and kwargs.get("attention_mask") is None:
        kwargs["attention_mask"] = jnp.ones_like(ids)
    if "position_ids" in names and kwargs.get("position_ids") is None:
        kwargs["position_ids"] = jnp.broadcast_to(jnp.arange(jnp.shape(ids)[-1]), jnp.shape(ids))
    return kwargs


def _module_and_variables(model, params, who: str) -> tuple[Any, Any]:
    """``(model.module, variables)`` with the variables nested as ``module.apply`` takes them."""
    module = getattr(model, "module", None)
    if module is None or not hasattr(module, "apply"):
        raise TypeError(
            f"{who}: expected a Hugging Face Flax model (a FlaxPreTrainedModel, with .module and .params); "
            f"got {type(model).__name__}. For a plain Flax Linen module use gcj.linen_tap; PyTorch models "
            f"(without the 'Flax' prefix) cannot be explained by a JAX library."
        )
    if params is None:
        try:
            params = model.params
        except ValueError as err:  # made with _do_init=False: the wrapper holds no parameters
            raise ValueError(
                f"{who}: the model holds no parameters (it was made with _do_init=False); pass them: "
                f"{who}(model, ..., params=params)."
            ) from err
    if isinstance(params, Mapping) and "params" in params:
        return module, params  # already {"params": ..., "batch_stats": ...}
    return module, {"params": params}


def _call_kwargs(module, pixel_layout: str, apply_kwargs: dict, who: str) -> dict:
    """``module.apply`` keywords: the image call, inference mode, then the user's own."""
    if "method" in apply_kwargs:
        raise TypeError(
            f"{who}: method= is not supported (the tap calls the module on pixel_values itself); to tap "
            f"another method, use gcj.linen_tap(model.module, variables, layer, method=...)."
        )
    layout = str(pixel_layout).upper()
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"{who}: pixel_layout must be 'NCHW' or 'NHWC'; got {pixel_layout!r}.")
    names = _call_parameters(module)
    keyword = "pixel_values" if "pixel_values" in names else None
    kwargs: dict[str, Any] = {"method": _PixelCall(layout == "NCHW", keyword)}
    if "deterministic" in names:
        kwargs["deterministic"] = True
    elif "train" in names:
        kwargs["train"] = False
    return {**kwargs, **apply_kwargs}


def _explained(err: Exception, who: str) -> ValueError:
    first = str(err).split(" (https://")[0].split("\n")[0]
    return ValueError(
        f"{who}: the parameters do not fit the model ({first}). The tap passes model.params as is when it "
        f"holds a 'params' collection (with 'batch_stats' for models with batch norm), else "
        f"{{'params': model.params}}; pass params= with every collection the model needs, e.g. "
        f"params={{'params': ..., 'batch_stats': ...}}, made for this model's config."
    )


def _with_friendly_errors(tap: Tap) -> Tap:
    """``tap`` whose Flax scope errors (missing collections or parameters) say what to pass."""
    inner = tap.apply

    def apply(params, x, edit):
        from flax import errors

        try:
            return inner(params, x, edit)
        except (errors.ScopeCollectionNotFound, errors.ScopeParamNotFoundError) as err:
            raise _explained(err, "hf_tap") from err

    return Tap(KeyedFunction(apply, ("hf", hashable(inner))), tap.params, tap.name, tap.layers)


def hf_tap(
    model,
    layer: str | None = None,
    *,
    layers: str | Sequence[str] | None = None,
    call: int | None = None,
    output: str | int | Callable | None = None,
    activation_layout: str | Layout | None = None,
    params: Any = None,
    pixel_layout: str = "NCHW",
    **apply_kwargs,
) -> Tap:
    """Split a Hugging Face Flax model at the layer whose module path is ``layer``.

    Args:
      model: a ``transformers`` Flax model, or anything with ``.module`` (a Linen module) and
        ``.params``.
      layer: the module path, joined with ``"/"`` (see :func:`hf_layers`), e.g.
        ``"resnet/encoder/stages/3"`` for a ResNet's last stage, or
        ``"vit/encoder/layer/1/layernorm_before"`` for a two-layer ViT's last block input (a
        ViT's head reads only the class token, so its last block's output has no gradient at the
        patch tokens: tap the last block's input and pass ``drop_tokens=1`` to the explainers).
      layers: instead of ``layer``, several layers from one forward pass: module paths and glob
        patterns (``"vit/encoder/layer/*/attention"``; ``*`` stays within a path segment, ``**``
        crosses them), as in :func:`linen_tap`. The tap returns ``(scores, {path: A})`` in call
        order; ``tap.select(path)`` is a single-layer tap on one of them.
      call: which call of the layer to tap when it is called more than once.
      output: where the scores are in the model's output: by default its ``.logits``; a field
        name (``"logits_per_image"`` for CLIP: image-text similarities, one column per text),
        an index, or a callable ``output -> scores``.
      activation_layout: the tapped activation's layout, if not channels-last (never needed for
        the Flax vision models of ``transformers``, which compute channels-last).
      params: the model's variables, when the model holds none (``_do_init=False``) or to
        explain other weights; nested as for ``model.params``.
      pixel_layout: the layout of the tap's input: ``"NCHW"`` (Hugging Face's ``pixel_values``
        convention, transposed for the module as the model's own ``__call__`` does; call the
        explainers with ``layout="NCHW"``), or ``"NHWC"`` for images already channels-last
        (passed to the module as they are).
      **apply_kwargs: more keywords of the module's ``__call__``, bound into the tap, e.g.
        ``input_ids=...`` for CLIP (the texts to compare with; ``attention_mask`` and
        ``position_ids`` are filled in as Hugging Face does). Bound arrays are constants of the
        compiled program. Inference mode (``deterministic=True``) is the default.

    Returns:
      A :class:`~gradcam_jax.Tap`; its parameters are the nested variables, so the explainers
      can be differentiated with respect to them (``tap.with_params``).

    Raises (when the tap is first run or traced):
      ValueError: the layer was not called (the message lists the layers, in call order), was
        called several times without ``call``, or the parameters lack a collection the model
        needs.
    """
    module, variables = _module_and_variables(model, params, "hf_tap")
    kwargs = _call_kwargs(module, pixel_layout, apply_kwargs, "hf_tap")
    tap = linen_tap(
        module,
        variables,
        layer,
        layers=layers,
        call=call,
        output=output,
        activation_layout=activation_layout,
        **kwargs,
    )
    return _with_friendly_errors(tap)


def hf_layers(model, x, *, params: Any = None, pixel_layout: str = "NCHW", **apply_kwargs) -> list[str]:
    """The module paths of every layer a Hugging Face Flax model calls on ``x``, in call order.

    Use it to find the ``layer=`` for :func:`hf_tap`. The model runs abstractly
    (``jax.eval_shape``): nothing is computed.

    Args:
      model, params, pixel_layout, **apply_kwargs: as in :func:`hf_tap`.
      x: an input batch, ``(B, C, H, W)`` by default (or a ``jax.ShapeDtypeStruct``).

    Returns:
      The paths, e.g. ``["resnet", "resnet/embedder", ...]`` (repeats kept).
    """
    from flax import errors

    module, variables = _module_and_variables(model, params, "hf_layers")
    kwargs = _call_kwargs(module, pixel_layout, apply_kwargs, "hf_layers")
    try:
        return linen_layers(module, variables, x, **kwargs)
    except (errors.ScopeCollectionNotFound, errors.ScopeParamNotFoundError) as err:
        raise _explained(err, "hf_layers") from err
