"""A pretrained classifier bundled with what explaining it needs.

:class:`Pretrained` holds a Flax Linen module and its variables together with the model's
input convention (size and normalisation), its class names and its default Grad-CAM layer,
and gives jitted ``logits`` / ``probs`` and ready taps.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._adapters import linen_layers, linen_tap

__all__ = ["Pretrained"]


def find_class(class_names, name: str, model_name: str) -> int:
    """The index of ``name`` in ``class_names`` (exact, case-insensitive); the error lists close names."""
    low = name.strip().lower()
    for i, n in enumerate(class_names):
        if n.lower() == low:
            return i
    close = [n for n in class_names if low in n.lower()][:10]
    hint = f" Names containing it: {', '.join(close)}." if close else ""
    raise ValueError(f"{model_name} has no class named {name!r}.{hint}")


class Pretrained:
    """A pretrained image classifier, ready to explain.

    Attributes:
      name: the model's name (``"efficientnet_lite0"``).
      module: the Flax Linen module.
      variables: its variables (``{"params": ..., "batch_stats": ...}``) as ``jax.Array``\\ s.
      class_names: one name per output class.
      input_size: the training resolution (``224``).
      default_layer: the layer :attr:`tap` splits at (``"head"``: the last convolutional
        feature map, after its activation).

    Use :meth:`preprocess` on ``uint8`` RGB images, then :meth:`logits` / :meth:`probs`, and
    :attr:`tap` (or :meth:`tap_at`) with :func:`gradcam_jax.grad_cam` and friends.
    """

    def __init__(
        self,
        name: str,
        module,
        variables,
        class_names: Sequence[str],
        *,
        input_size: int = 224,
        mean: float | Sequence[float] = 127.0,
        std: float | Sequence[float] = 128.0,
        default_layer: str = "head",
        source: str | None = None,
    ):
        self.name = name
        self.module = module
        self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
        self.class_names = tuple(class_names)
        self.input_size = int(input_size)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.default_layer = default_layer
        self.source = source
        apply = module.apply
        self._logits = jax.jit(lambda variables, x: apply(variables, x))

    def __repr__(self):
        return (
            f"Pretrained({self.name!r}, {len(self.class_names)} classes, input "
            f"{self.input_size}x{self.input_size}, default layer {self.default_layer!r})"
        )

    # ---------------------------------------------------------------- input

    def preprocess(self, images, size: int | None = None) -> jax.Array:
        """``uint8`` RGB images of any size -> the model's input ``(B, size, size, 3)`` float32.

        Each image is resized to ``size x size`` (default :attr:`input_size`) with antialiased
        bilinear interpolation (aspect ratio not kept), then normalised as the model was
        trained: ``(x - mean) / std`` on the 0-255 scale — for EfficientNet-Lite
        ``(x - 127) / 128``.

        Args:
          images: one image ``(H, W, 3)``, a batch ``(B, H, W, 3)``, or a list of images of
            different sizes. ``uint8``, or floats on the same 0-255 scale. Grayscale
            ``(H, W)`` images are repeated to three channels; an alpha channel is dropped.
          size: the output side; default :attr:`input_size`.
        """
        size = self.input_size if size is None else int(size)
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("preprocess: got an empty list of images.")
            return jnp.concatenate([self.preprocess(im, size) for im in images], axis=0)
        x = images
        if not hasattr(x, "ndim"):
            x = np.asarray(x)
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim == 3:
            if x.shape[-1] not in (1, 3, 4):
                raise ValueError(f"preprocess: an image must be (H, W, 3) RGB; got shape {tuple(x.shape)}.")
            x = x[None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"preprocess: expected (H, W, 3), (B, H, W, 3) or a list of images; got shape "
                f"{tuple(x.shape)}."
            )
        if x.shape[-1] == 1:
            x = jnp.repeat(jnp.asarray(x), 3, axis=-1)
        elif x.shape[-1] == 4:
            x = x[..., :3]
        return _resize_normalize(jnp.asarray(x), size, jnp.asarray(self.mean), jnp.asarray(self.std))

    # ---------------------------------------------------------------- outputs

    def logits(self, x) -> jax.Array:
        """Class logits ``(B, num_classes)`` for a preprocessed batch (jit-compiled)."""
        return self._logits(self.variables, x)

    def probs(self, x) -> jax.Array:
        """Softmax probabilities ``(B, num_classes)`` for a preprocessed batch."""
        return jax.nn.softmax(self.logits(x), axis=-1)

    def top_k(self, x, k: int = 5) -> list[list[tuple[int, str, float]]]:
        """The ``k`` most probable classes per example: ``[(index, name, probability), ...]``."""
        p = np.asarray(self.probs(x))
        order = np.argsort(-p, axis=-1)[:, :k]
        return [[(int(i), self.class_names[i], float(p[b, i])) for i in row] for b, row in enumerate(order)]

    def class_index(self, name: str) -> int:
        """The index of a class by its exact name (case-insensitive)."""
        return find_class(self.class_names, name, self.name)

    # ---------------------------------------------------------------- explaining

    @functools.cached_property
    def tap(self):
        """A :func:`gradcam_jax.linen_tap` at :attr:`default_layer`."""
        return self.tap_at(self.default_layer)

    def tap_at(self, layer: str, **kwargs):
        """A :func:`gradcam_jax.linen_tap` at another layer (a path from :attr:`layers`)."""
        return linen_tap(self.module, self.variables, layer, **kwargs)

    @functools.cached_property
    def layers(self) -> tuple[str, ...]:
        """Every layer path, in call order (for :meth:`tap_at`)."""
        x = jax.ShapeDtypeStruct((1, self.input_size, self.input_size, 3), jnp.float32)
        return tuple(linen_layers(self.module, self.variables, x))


@functools.partial(jax.jit, static_argnames=("size",))
def _resize_normalize(x, size: int, mean, std):
    x = x.astype(jnp.float32)
    b, h, w, c = x.shape
    if (h, w) != (size, size):
        x = jax.image.resize(x, (b, size, size, c), method="bilinear", antialias=True)
    return (x - mean) / std
