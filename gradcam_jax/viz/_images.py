"""Heatmap overlays, gradient images and PNG files (see :mod:`gradcam_jax.viz`)."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np

__all__ = [
    "overlay",
    "gradient_image",
    "save_png",
    "png_bytes",
    "resize_map",
    "resize_linear",
    "resize_rgb",
    "as_uint8_image",
    "METHOD_TITLES",
    "NOT_AN_IMAGE",
]

#: How method names are printed in figure headers.
METHOD_TITLES = {
    "grad_cam": "Grad-CAM",
    "grad_cam_plus_plus": "Grad-CAM++",
    "xgrad_cam": "XGrad-CAM",
    "hires_cam": "HiResCAM",
    "layer_cam": "LayerCAM",
    "eigen_cam": "Eigen-CAM",
    "eigen_grad_cam": "Eigen-Grad-CAM",
    "score_cam": "Score-CAM",
    "ablation_cam": "Ablation-CAM",
    "cam": "CAM",
    "grad_cam_elementwise": "Grad-CAM element-wise",
    "kpca_cam": "KPCA-CAM",
    "shapley_cam": "ShapleyCAM",
    "finer_cam": "Finer-CAM",
    "random_cam": "RandomCAM",
    "ss_cam": "SS-CAM",
    "is_cam": "IS-CAM",
    "fullgrad": "FullGrad",
    "guided_backprop": "Guided Backprop",
    "deconvnet": "Deconvnet",
    "guided_grad_cam": "Guided Grad-CAM",
}


#: The pointer that image-only functions give for inputs of another spatial rank.
NOT_AN_IMAGE = (
    "For a 1-D signal (T,) / (T, C) and its (T,) maps use viz.signal_figure; for a volume or video "
    "(D, H, W[, C]) and its (D, H, W) heatmap use viz.volume_figure."
)


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------


def as_uint8_image(image) -> np.ndarray:
    """``uint8`` RGB from uint8, bool, or float in [0, 1]; gray and RGBA handled."""
    im = np.asarray(image)
    if im.dtype == np.uint8:
        out = im
    elif im.dtype == bool:
        out = im.astype(np.uint8) * 255
    elif np.issubdtype(im.dtype, np.floating):
        out = np.clip(np.nan_to_num(im.astype(np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif np.issubdtype(im.dtype, np.integer):
        out = np.clip(im, 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"Cannot show an image of dtype {im.dtype}.")
    if out.ndim >= 2 and (out.ndim == 2 or out.shape[-1] not in (1, 3, 4)):
        out = out[..., None]  # gray (…, H, W)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 4:
        out = out[..., :3]
    return out


def resize_map(m, size) -> np.ndarray:
    """Bilinear resize of the last two axes of ``m`` (float maps) to ``size = (H, W)``."""
    from PIL import Image

    m = np.asarray(m, np.float32)
    h, w = int(size[0]), int(size[1])
    if m.shape[-2:] == (h, w):
        return m
    flat = m.reshape((-1,) + m.shape[-2:])
    images = (Image.fromarray(np.ascontiguousarray(f, np.float32)) for f in flat)
    out = np.stack([np.asarray(im.resize((w, h), Image.Resampling.BILINEAR)) for im in images])
    return out.reshape(m.shape[:-2] + (h, w))


def linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix of a linear resize with half-pixel centres (edges clamped)."""
    x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (x - lo).astype(np.float32)
    weights = np.zeros((n_out, n_in), np.float32)
    np.add.at(weights, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), hi), frac)
    return weights


def resize_linear(m, shape) -> np.ndarray:
    """Linear resize of the last ``len(shape)`` axes of ``m`` (1-D linear, 2-D bilinear, 3-D
    trilinear), with half-pixel centres like :func:`gradcam_jax.postprocess.upsample_to`.

    Args:
      m: a float array ``(…, *spatial)``.
      shape: the new sizes of its last ``len(shape)`` axes.

    Returns:
      ``float32`` ``(…, *shape)``; ``m`` itself (as float32) where the sizes already match.

    >>> resize_linear(np.array([0.0, 1.0]), (4,)).tolist()
    [0.0, 0.25, 0.75, 1.0]
    """
    out = np.asarray(m, np.float32)
    k = len(shape)
    for i, n in enumerate(shape):
        axis = out.ndim - k + i
        if out.shape[axis] != int(n):
            moved = np.tensordot(linear_weights(out.shape[axis], int(n)), np.moveaxis(out, axis, 0), axes=1)
            out = np.moveaxis(moved, 0, axis)
    return out


def resize_rgb(img: np.ndarray, size) -> np.ndarray:
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))


def _colormap(cmap):
    import matplotlib

    if isinstance(cmap, str):
        return matplotlib.colormaps[cmap]
    return cmap


def _finite_heat(hm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``hm`` clipped to [0, 1] with NaN set to 0, and where it was NaN; warns about both."""
    nan = np.isnan(hm)
    inf = np.isinf(hm)
    if nan.any():
        warnings.warn(
            f"overlay: the heatmap holds {int(nan.sum())} NaN value(s) — a NaN map: the explained score or "
            f"the map was NaN, so there is no evidence to show there. Drawn as grey hatching.",
            stacklevel=3,
        )
    if inf.any():
        warnings.warn(
            f"overlay: the heatmap holds {int(inf.sum())} infinite value(s); clipped to [0, 1] (+inf drawn "
            f"as 1, -inf as 0). Maps are expected in [0, 1] (normalize=True).",
            stacklevel=3,
        )
    return np.clip(np.where(nan, 0.0, hm), 0.0, 1.0).astype(np.float32), nan


def _hatch(size) -> np.ndarray:
    """Diagonal grey stripes ``(H, W, 3)``: where a heatmap is NaN (no colour of any colormap)."""
    yy, xx = np.indices((int(size[0]), int(size[1])))
    grey = np.where(((yy + xx) // 4) % 2 == 0, 0.45, 0.65).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=-1)


def overlay(image, heatmap, alpha: float = 0.5, cmap="jet") -> np.ndarray:
    """Blend a colour-mapped heatmap over an image.

    Args:
      image: ``(H, W, 3)`` or a batch ``(B, H, W, 3)``; ``uint8``, or floats in [0, 1].
      heatmap: ``(h, w)`` or ``(B, h, w)`` values in [0, 1] (e.g. :func:`gradcam_jax.grad_cam`
        maps); resized bilinearly to ``(H, W)`` when its size differs. A map with a class axis
        ``(K, h, w)`` (or ``(B, K, h, w)``) gives ``K`` overlays of the same image.
      alpha: the heatmap's weight; ``0`` shows only the image, ``1`` only the heatmap.
      cmap: a Matplotlib colormap name or object (``"jet"``, the usual Grad-CAM look;
        ``"inferno"`` or ``"turbo"`` are perceptually kinder).

    Returns:
      ``uint8`` RGB: ``(H, W, 3)``, ``(B, H, W, 3)``, or with the extra class axis of
      ``heatmap``.

    Images only: a 1-D map or a signal gets an error pointing to :func:`signal_figure`, a 5-D input
    or a volume whose heatmap has fewer slices one pointing to :func:`volume_figure`.

    NaN in the heatmap (a NaN map: its score or map was NaN) is drawn as grey hatching, never
    as a colour of the colormap, with a warning; infinite values are clipped, with a warning.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}.")
    img = as_uint8_image(image)
    hm = np.asarray(heatmap, np.float32)
    if img.ndim not in (3, 4) or hm.ndim < 2:
        bad_image = img.ndim not in (3, 4)
        what = f"image of shape {np.shape(image)}" if bad_image else f"heatmap of shape {hm.shape}"
        raise ValueError(
            f"overlay: expected an image (H, W, 3) or (B, H, W, 3) and an (h, w) heatmap (or batched); got "
            f"an {what}. {NOT_AN_IMAGE}"
        )
    lead_img = img.shape[:-3]
    lead_hm = hm.shape[:-2]
    # Accept (…, h, w) whose leading axes extend the image's (batch, then classes).
    if lead_hm[: len(lead_img)] != lead_img:
        raise ValueError(
            f"overlay: {img.shape[0] if lead_img else 1} image(s) of shape {img.shape}, but heatmap "
            f"of shape {hm.shape}: give one (h, w) map per image, or (K, h, w) per image. For a volume "
            "or video (D, H, W[, C]) with a (d, h, w) heatmap, use viz.volume_figure (it resizes the depth "
            "too)."
        )
    hm, nan = _finite_heat(hm)
    hm = resize_map(hm, img.shape[-3:-1])
    colours = _colormap(cmap)(hm)[..., :3].astype(np.float32)  # (…, H, W, 3) in [0, 1]
    if nan.any():
        nan = resize_map(nan.astype(np.float32), img.shape[-3:-1]) >= 0.5
        colours = np.where(nan[..., None], _hatch(img.shape[-3:-1]), colours)
    extra = hm.ndim - 2 - len(lead_img)
    base = img.astype(np.float32) / 255.0
    base = base.reshape(lead_img + (1,) * extra + img.shape[-3:])
    out = (1.0 - alpha) * base + alpha * colours
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def gradient_image(grad, contrast: float = 0.15) -> np.ndarray:
    """An input-gradient map ``(…, H, W, C)`` as a viewable ``uint8`` RGB image.

    Each map is centred on grey and scaled by its own standard deviation
    (``0.5 + contrast * (g - mean) / std``, clipped to [0, 1]) — the usual way Guided Backprop
    and Guided Grad-CAM are shown. An all-zero map is plain grey.
    """
    g = np.nan_to_num(np.asarray(grad, np.float32))
    if g.ndim < 3:
        raise ValueError(f"gradient_image: expected (..., H, W, C) input gradients; got shape {g.shape}.")
    axes = (-3, -2, -1)
    mean = g.mean(axis=axes, keepdims=True)
    std = g.std(axis=axes, keepdims=True)
    z = np.where(std > 0, (g - mean) / np.where(std > 0, std, 1.0), 0.0)
    return as_uint8_image(np.clip(0.5 + contrast * z, 0.0, 1.0))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def png_bytes(fig_or_image, dpi: float | None = None) -> bytes:
    """A figure (or a ``uint8`` image) encoded as PNG."""
    buf = io.BytesIO()
    _write_png(fig_or_image, buf, dpi)
    return buf.getvalue()


def save_png(fig_or_image, path: str | os.PathLike, dpi: float | None = None) -> str:
    """Write a Matplotlib figure, or an image array (``uint8``, or floats in [0, 1]), as PNG.

    Returns the path written. Parent folders are created.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        _write_png(fig_or_image, f, dpi)
    return path


def _write_png(obj, f, dpi):
    if hasattr(obj, "savefig"):
        obj.savefig(
            f,
            format="png",
            dpi=dpi or obj.dpi,
            facecolor=obj.get_facecolor(),
            metadata={"Software": "gradcam_jax"},
        )
        return
    from PIL import Image

    img = as_uint8_image(obj)
    if img.ndim != 3:
        raise ValueError(
            f"save_png: an image must be (H, W, 3); got shape {img.shape}. Save batch items one by one."
        )
    Image.fromarray(img).save(f, format="PNG")
