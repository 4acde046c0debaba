"""FullGrad: the input-gradient and every biased layer's bias-gradient maps, from one forward pass.

A network with biases decomposes as ``f(x) = grad_x f · x + sum_l grad_{b_l} f · b_l`` (the
full-gradient representation). FullGrad's saliency map shows both parts in space: the input's
``|grad_x f ⊙ x|`` and, for each layer ``l`` whose output is ``z_l = ... + b_l``, the
per-position bias-gradients ``|b_l ⊙ d f / d z_l|``. The layers are a multi-layer tap
(``layers=[...]``: every convolution with a bias and every BatchNorm, whose bias in inference is
``beta - mean * gamma / sqrt(var + eps)``; :func:`linen_biases` reads them from a Linen model's
variables): one ``jax.vjp`` with respect to the input and every layer's delta gives all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ._grads import check_tap_target, tap_shapes
from ._inputs import image_of, with_image
from ._maps import MapOptions, check_images, kernel, map_geometry, to_grid
from ._smoothing import augmented_maps, check_aug_smooth
from ._tap import Tap, as_tap
from ._targets import Target, TargetSpec, batch_size, nan_where, pull_back, select_scores, target_spec
from .postprocess import normalize_maps, upsample_to

__all__ = ["fullgrad", "linen_biases"]


@dataclasses.dataclass(frozen=True)
class FullGradOptions:
    """The static options of :func:`fullgrad_kernel`."""

    maps: MapOptions
    aug: bool = False


def channel_saliency(m, rank: int):
    """``sum_c normalise(|m_c|)`` over the channels of ``m`` ``(B, *spatial, C)``: each channel's map
    min-max normalised on its own at its resolution (FullGrad's ``psi``, before the resize)."""
    per_channel = normalize_maps(jnp.moveaxis(jnp.abs(m), -1, 1), rank)  # (B, C, *spatial)
    return jnp.sum(per_channel, axis=1)


def fullgrad_vjp(tap: Tap, x, spec: TargetSpec, options: FullGradOptions):
    """``(selected, pullback, image)``: one ``jax.vjp`` with respect to the image and every layer."""
    view = check_images(x, options.maps, "fullgrad")
    image = image_of(x, view)
    _, act_spec = tap_shapes(tap, x)
    delta0 = {k: jnp.zeros(s.shape, s.dtype) for k, s in act_spec.items()}

    def objective(image, delta):
        scores, _ = tap(with_image(x, view, image), delta)
        return select_scores(spec, scores)

    selected, pullback = jax.vjp(objective, image, delta0)
    return selected, pullback, image


def fullgrad_from_grads(image, g_image, g_layers, biases, options: FullGradOptions, size, rank):
    """The FullGrad map from the input's and the layers' gradients (one target per example)."""
    total = upsample_to(channel_saliency(g_image * image, rank), size, options.maps.interpolation)
    for name, g in g_layers.items():
        g = to_grid(g, options.maps.drop_tokens, options.maps.grid, rank).astype(jnp.float32)
        layer = channel_saliency(g * biases[name].astype(jnp.float32), rank)
        total = total + upsample_to(layer, size, options.maps.interpolation)
    return normalize_maps(total, rank) if options.maps.normalize else total


@kernel
def fullgrad_kernel(tap: Tap, x, target: TargetSpec, biases, *, options: FullGradOptions):
    """FullGrad's maps under ``jit`` (see :func:`fullgrad`)."""
    if not options.aug:
        return fullgrad_once(tap, x, target, biases, options)
    maps, _ = augmented_maps(
        lambda xa: (fullgrad_once(tap, xa, target, biases, options), None), x, options.maps, "fullgrad"
    )
    return maps


def fullgrad_once(tap: Tap, x, target: TargetSpec, biases, options: FullGradOptions):
    size, rank = map_geometry(x, options.maps, "fullgrad")
    selected, pullback, image = fullgrad_vjp(tap, x, target, options)
    g_image, g_layers = pull_back(pullback, selected)
    image = image.astype(jnp.float32)
    if selected.ndim == 1:
        maps = fullgrad_from_grads(image, g_image, g_layers, biases, options, size, rank)
    else:
        maps = jax.vmap(lambda gi, gl: fullgrad_from_grads(image, gi, gl, biases, options, size, rank))(
            g_image, g_layers
        )
        maps = jnp.moveaxis(maps, 0, 1)  # (B, K, ...)
    return nan_where(jnp.isnan(selected), maps)


def linen_biases(variables: Mapping, layers, eps: float = 1e-5) -> dict[str, jax.Array]:
    """The bias of each Linen layer in ``layers`` (paths such as ``"stage1/block0/bn1"``).

    A layer with ``batch_stats`` (``BatchNorm`` in inference) has the bias
    ``bias - mean * scale / sqrt(var + eps)`` (``eps``: the layer's epsilon, Flax's default
    1e-5); any other layer its ``bias`` parameter.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gradcam_jax.fullgrad import linen_biases
      >>> v = {"params": {"bn": {"scale": jnp.array([2.0]), "bias": jnp.array([1.0])}},
      ...      "batch_stats": {"bn": {"mean": jnp.array([3.0]), "var": jnp.array([4.0 - 1e-5])}}}
      >>> linen_biases(v, ["bn"])["bn"].tolist()
      [-2.0]
    """

    def at(tree, path):
        for part in path.split("/"):
            if not isinstance(tree, Mapping) or part not in tree:
                return None
            tree = tree[part]
        return tree

    out = {}
    for layer in layers:
        params = at(variables.get("params", {}), layer)
        if params is None or "bias" not in params:
            raise ValueError(f"linen_biases: layer {layer!r} has no 'bias' parameter in variables['params'].")
        stats = at(variables.get("batch_stats", {}), layer)
        bias = jnp.asarray(params["bias"], jnp.float32)
        if stats is not None and "mean" in stats:
            scale = jnp.asarray(params.get("scale", 1.0), jnp.float32)
            bias = bias - stats["mean"] * scale / jnp.sqrt(stats["var"] + eps)
        out[layer] = bias
    return out


def fullgrad(
    tap,
    x,
    target: Target = None,
    *,
    biases: Mapping[str, Any] | None = None,
    normalize: bool = True,
    interpolation: str = "bilinear",
    drop_tokens: int = 0,
    grid: tuple[int, ...] | None = None,
    layout: str | None = None,
    input: Any = None,
    upsample: bool = True,
    relu: bool = True,
    counterfactual: bool = False,
    aug_smooth: bool = False,
    eigen_smooth: bool = False,
) -> jax.Array:
    """FullGrad: the input-gradient map plus every biased layer's bias-gradient maps.

    With ``psi(m)`` = each channel of ``|m|`` min-max normalised at its own resolution, summed over
    channels, and upsampled to the image (bilinear)::

        S = psi(grad_x y^c ⊙ x) + sum_l psi(b_l ⊙ d y^c / d z_l)

    then ``S`` min-max normalised — pytorch-grad-cam's ``FullGrad`` (which normalises each
    channel, resizes it and sums; resizing is linear, so summing first and resizing once is the
    same map at a fraction of the memory). ``z_l`` are the tapped layers' outputs (a multi-layer
    tap on every layer with a bias: convolutions with a bias, BatchNorms), ``b_l`` their biases.
    One forward pass and one pullback (with respect to the input and every layer at once).

    Args:
      tap: a multi-layer tap (``layers=[...]``) on the outputs of the layers with a bias.
      x: images ``(B, H, W, C)``.
      target: as in :func:`gradcam_jax.cam`.
      biases: ``{layer: (C,) bias}`` for every tapped layer (e.g. :func:`linen_biases`).
      normalize, interpolation, drop_tokens, grid, layout, input, aug_smooth: as in
        :func:`gradcam_jax.cam`.
      upsample, relu, counterfactual, eigen_smooth: :func:`gradcam_jax.cam`'s options that do not
        apply (the layers' maps are summed at the input's size; the map is a sum of absolute
        values): only their defaults are accepted (``relu`` is a no-op).

    Returns:
      ``float32`` maps ``(B, H, W)``, or ``(B, K, H, W)`` for K targets per example.

    Examples:
      >>> import jax, jax.numpy as jnp, gradcam_jax as gcj
      >>> from gradcam_jax.fullgrad import fullgrad
      >>> b = jnp.array([0.1, -0.2, 0.3])
      >>> def forward(x, mark):
      ...     return mark("conv", jnp.tanh(x) + b).mean(axis=(1, 2))
      >>> tap = gcj.marked_tap(forward, layers=["conv"])
      >>> fullgrad(tap, jnp.ones((2, 4, 4, 3)), 0, biases={"conv": b}).shape
      (2, 4, 4)

    References:
      Srinivas & Fleuret, "Full-Gradient Representation for Neural Network Visualization",
      NeurIPS 2019, https://arxiv.org/abs/1905.00780.
    """
    # long-function: the docstring documents every option; the body is the checks and one kernel call.
    if not upsample or counterfactual or eigen_smooth:
        raise ValueError(
            "fullgrad sums maps of layers of several resolutions at the input's size, of absolute values: "
            "upsample=False, counterfactual=True and eigen_smooth=True do not apply."
        )
    del relu  # |.| everywhere: the map is never negative
    maps = MapOptions(True, normalize, False, interpolation, False, drop_tokens, grid, layout, input)
    tap = as_tap(tap)
    check_images(x, maps, "fullgrad")
    if aug_smooth:
        check_aug_smooth(x, maps, "fullgrad")
    spec = target_spec(target, batch_size(x))
    check_tap_target(tap, x, spec, "fullgrad", several=True)
    layers = tap_shapes(tap, x)[1]
    if not isinstance(layers, Mapping):
        raise ValueError(
            "fullgrad needs a multi-layer tap on every layer with a bias (layers=[...], e.g. "
            "linen_tap(module, variables, layers=['**/bn*', '**/conv*'])), with biases={layer: bias}."
        )
    if biases is None:
        raise ValueError(
            f"fullgrad needs biases={{layer: (C,) bias}} for the tapped layers {list(layers)} "
            f"(for a Flax Linen model: gcj.linen_biases(variables, layers))."
        )
    missing = [name for name in layers if name not in biases]
    if missing:
        raise ValueError(
            f"fullgrad: biases has no entry for the tapped layer(s) {missing}; give one (C,) bias each."
        )
    bias = {}
    for name, a in layers.items():
        bias[name] = jnp.asarray(biases[name])
        if bias[name].shape != a.shape[-1:]:
            raise ValueError(
                f"fullgrad: the bias of {name!r} has shape {bias[name].shape}; the layer has "
                f"{a.shape[-1]} channels."
            )
    return fullgrad_kernel(tap, x, spec, bias, options=FullGradOptions(maps, bool(aug_smooth)))
