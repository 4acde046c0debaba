"""Models for ``gradcam-jax ... --model cli_model:FACTORY`` in tests/test_cli.py, built on the small
conv net of tests/nets.py (random weights):

- ``tiny_tap``: a bare tap (no class names, no preprocessing), for ``explain-dir``;
- ``tiny_model``: a whole model following ``gradcam_jax.cli.models.ExplainableModel``
  (preprocess, logits, class_names, tap, tap_at, layers, input_size, name);
- ``without_preprocess`` and ``without_tap_at``: the same model missing a member.
"""

import jax
import jax.numpy as jnp
import nets
import numpy as np

import gradcam_jax as gcj

FRUITS = ("apple", "banana", "cherry", "damson", "elderberry")
SIZE = 16


def read_npz(path):
    """The arrays of a ``--save-maps`` file as a dict, the file closed again (an open ``NpzFile``
    left to the garbage collector raises a ResourceWarning in whichever later test collects it)."""
    with np.load(path) as saved:
        return {name: saved[name] for name in saved.files}


def tiny_tap():
    """tests/nets.py's net split after its second conv block (maps at the input's resolution)."""
    features, head = nets.split_functions(nets.weights(0))
    return gcj.split_tap(features, head)


class TinyClassifier:
    """The Linen twin of tests/nets.py as a zoo-like model: 5 fruit classes, 16 x 16 input."""

    name = "tiny_fruit_net"
    class_names = FRUITS
    input_size = SIZE
    default_layer = "block2"

    def __init__(self, seed=0):
        self.module, self.variables = nets.linen(nets.weights(seed))
        self.tap = self.tap_at(self.default_layer)
        self.layers = tuple(
            gcj.linen_layers(self.module, self.variables, jnp.zeros((1, SIZE, SIZE, 3), jnp.float32))
        )

    def preprocess(self, images):
        """uint8 (H, W, 3) or (B, H, W, 3) -> float32 (B, 16, 16, 3) in [0, 1] (traceable)."""
        x = jnp.asarray(images, jnp.float32)
        x = x[None] if x.ndim == 3 else x
        if x.shape[1:3] != (SIZE, SIZE):
            x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, x.shape[-1]), method="bilinear")
        return x / 255.0

    def logits(self, x):
        return self.module.apply(self.variables, x)

    def tap_at(self, layer):
        return gcj.linen_tap(self.module, self.variables, layer)


def tiny_model():
    return TinyClassifier()


class _NoPreprocess:
    class_names = FRUITS

    def __init__(self):
        self.tap = tiny_tap()

    def logits(self, x):
        return self.tap(x)[0]


def without_preprocess():
    return _NoPreprocess()


class _NoTapAt(_NoPreprocess):
    def preprocess(self, images):
        return TinyClassifier.preprocess(self, images)


def without_tap_at():
    return _NoTapAt()
