"""LRP rules for one layer ``z = A * L(x; W) + C`` (a conv / dense / pooling node and its affine tail).

Each rule maps the relevance ``R`` of the layer's output to its input, in the general form of
zennit's ``BasicHook``: a few *modified* copies of the layer (inputs clamped, weights and
biases clamped or rescaled), a stabilised quotient ``s = R / stab(z')`` and their transposes::

    Epsilon  R_x = x * L^T(s),                    z' = z,            s = R / (z' + eps sign(z'))
    ZPlus    R_x = x+ L+^T(s) + x- L-^T(s),       z' = L+(x+) + C+ + L-(x-)
    AlphaBeta    alpha (x+ L+^T(s+) + x- L-^T(s+)) - beta (x+ L-^T(s-) + x- L+^T(s-))
    Gamma    as ZPlus with W + gamma W+ (and W + gamma W- for negative outputs)
    Flat     R_x = L1^T(s),                       z' = L(1; W = 1)   (bias dropped)
    ZBox     R_x = x L^T(s) - l L+^T(s) - h L-^T(s),  z' = z - L+(l) - C+ - L-(h) - C-

where ``L+`` is the layer with its *effective* weights ``A * W`` clamped at zero (a batch norm
folded into the preceding conv scales each output's row: ``(A W)+ = A+ W+ + A- W-``), and
``sign(0) = 1`` in every stabiliser (zennit's and Captum's convention).

References:
  Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise
  Relevance Propagation", PLoS ONE 2015; Montavon et al., "Layer-Wise Relevance Propagation:
  An Overview", 2019, https://doi.org/10.1007/978-3-030-28954-6_10; Anders et al., "Software
  for Dataset-wide XAI" (zennit), 2021, https://arxiv.org/abs/2106.13200.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ._tape import Layer

__all__ = [
    "stabilize",
    "LayerOps",
    "Epsilon",
    "ZPlus",
    "AlphaBeta",
    "Gamma",
    "Flat",
    "ZBox",
    "Norm",
    "Rule",
]


def stabilize(z, eps: float):
    """``z + eps * sign(z)`` with ``sign(0) = 1``."""
    return z + eps * jnp.where(z >= 0, 1.0, -1.0).astype(z.dtype)


def _pos(v):
    return jnp.maximum(v, 0)


def _neg(v):
    return jnp.minimum(v, 0)


class LayerOps:
    """A layer's modified forward copies ``out(x, w, b)`` and their transposes ``back(x, w, s)``.

    Weight modes: ``"id"`` (``A W``), ``"pos"`` / ``"neg"`` (``(A W)+`` / ``(A W)-``),
    ``"gpos"`` / ``"gneg"`` (``A W + gamma (A W)+-``), ``"ones"`` (all ones); bias modes the
    same on ``C`` plus ``"zero"``.
    """

    def __init__(self, layer: Layer, gamma: float = 0.0, z=None):
        self.layer, self.gamma, self.z = layer, gamma, z

    def forward(self, x):
        """The layer's output ``z = A L(x; W) + C`` (the recorded one when the tape gave it)."""
        return self.out(x, "id", "id") if self.z is None else self.z

    def _lin(self, x, which: str):
        layer = self.layer
        if layer.weight is None:  # a weightless reduction: W = 1 >= 0
            return jnp.zeros_like(layer.linear(x)) if which == "W-" else layer.linear(x)
        w = layer.weight
        w = {"W": w, "W+": _pos(w), "W-": _neg(w), "1": jnp.ones_like(w)}[which]
        return layer.linear(x, w)

    def weights(self, x, mode: str):
        A, folded = self.layer.A, self.layer.folded
        if mode == "ones":
            return self._lin(x, "1")
        if mode == "id":
            return A * self._lin(x, "W")
        if folded is not None:  # A scales whole output features: one product per modified copy
            w = {"pos": _pos(folded), "neg": _neg(folded)}.get(mode)
            if w is None:
                w = folded + self.gamma * (_pos(folded) if mode == "gpos" else _neg(folded))
            return self.layer.linear(x, w)
        pos = _pos(A) * self._lin(x, "W+") + _neg(A) * self._lin(x, "W-")
        neg = _pos(A) * self._lin(x, "W-") + _neg(A) * self._lin(x, "W+")
        if mode in ("pos", "neg"):
            return pos if mode == "pos" else neg
        return A * self._lin(x, "W") + self.gamma * (pos if mode == "gpos" else neg)

    def bias(self, mode: str):
        C = self.layer.C
        modes = {
            "id": lambda: C,
            "pos": lambda: _pos(C),
            "neg": lambda: _neg(C),
            "gpos": lambda: C + self.gamma * _pos(C),
            "gneg": lambda: C + self.gamma * _neg(C),
            "zero": lambda: jnp.zeros_like(C),
        }
        return modes[mode]()

    def out(self, x, w: str, b: str):
        return self.weights(x, w) + self.bias(b)

    def back(self, x, w: str, s):
        _, pullback = jax.vjp(lambda v: self.weights(v, w), x)
        return pullback(s.astype(x.dtype))[0]


@dataclasses.dataclass(frozen=True)
class Epsilon:
    """LRP-ε: ``R_x = x * L^T(R / (z + eps sign z))``; ``epsilon -> 0`` is LRP-0."""

    epsilon: float = 1e-6

    def __call__(self, ops: LayerOps, x, r):
        s = r / stabilize(ops.forward(x), self.epsilon)
        return x * ops.back(x, "id", s)


@dataclasses.dataclass(frozen=True)
class Norm(Epsilon):
    """The ε rule with ε only a stabiliser (zennit's ``Norm``: pooling and residual sums)."""


@dataclasses.dataclass(frozen=True)
class ZPlus:
    """LRP-z⁺ (α1β0): positive contributions ``x+ (A W)+`` and ``x- (A W)-`` only."""

    stabilizer: float = 1e-6

    def __call__(self, ops: LayerOps, x, r):
        if ops.layer.nonneg:  # x- = 0: one modified copy
            s = r / stabilize(ops.out(x, "pos", "pos"), self.stabilizer)
            return x * ops.back(x, "pos", s)
        xp, xn = _pos(x), _neg(x)
        z = ops.out(xp, "pos", "pos") + ops.out(xn, "neg", "zero")
        s = r / stabilize(z, self.stabilizer)
        return xp * ops.back(xp, "pos", s) + xn * ops.back(xn, "neg", s)


@dataclasses.dataclass(frozen=True)
class AlphaBeta:
    """LRP-αβ: ``alpha`` times the positive part minus ``beta`` times the negative (``alpha - beta = 1``)."""

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6

    def __post_init__(self):
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1) > 1e-12:
            raise ValueError(
                f"AlphaBeta needs alpha, beta >= 0 and alpha - beta = 1; got {self.alpha}, {self.beta}."
            )

    def __call__(self, ops: LayerOps, x, r):
        if ops.layer.nonneg:  # x- = 0; with P = L(x; (A W)+): L(x; (A W)-) = z - C - P
            p = ops.weights(x, "pos")
            sa = r / stabilize(p + ops.bias("pos"), self.stabilizer)
            sb = r / stabilize(ops.forward(x) - ops.bias("id") - p + ops.bias("neg"), self.stabilizer)
            a, b = self.alpha, self.beta
            return x * (ops.back(x, "pos", a * sa + b * sb) - b * ops.back(x, "id", sb))
        xp, xn = _pos(x), _neg(x)
        sa = r / stabilize(ops.out(xp, "pos", "pos") + ops.out(xn, "neg", "zero"), self.stabilizer)
        sb = r / stabilize(ops.out(xp, "neg", "neg") + ops.out(xn, "pos", "zero"), self.stabilizer)
        ra = xp * ops.back(xp, "pos", sa) + xn * ops.back(xn, "neg", sa)
        rb = xp * ops.back(xp, "neg", sb) + xn * ops.back(xn, "pos", sb)
        return self.alpha * ra - self.beta * rb


@dataclasses.dataclass(frozen=True)
class Gamma:
    """Generalised LRP-γ (zennit's ``Gamma``): weights ``W + gamma W+`` where the output is positive,
    ``W + gamma W-`` where it is negative."""

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def __call__(self, ops: LayerOps, x, r):
        ops = LayerOps(ops.layer, self.gamma, ops.z)
        y = ops.forward(x)
        if ops.layer.nonneg:  # x- = 0; one modified copy P = L(x; (A W)+), as (A W)- = A W - (A W)+
            g, p, lin = self.gamma, ops.weights(x, "pos"), y - ops.bias("id")
            z_up = y + g * (p + ops.bias("pos"))
            z_down = y + g * (lin - p + ops.bias("neg"))
            s_up = jnp.where(y > 0, r, 0) / stabilize(z_up, self.stabilizer)
            s_down = jnp.where(y < 0, r, 0) / stabilize(z_down, self.stabilizer)
            return x * (ops.back(x, "id", s_up + (1 + g) * s_down) + g * ops.back(x, "pos", s_up - s_down))
        xp, xn = _pos(x), _neg(x)
        z_up = ops.out(xp, "gpos", "gpos") + ops.out(xn, "gneg", "zero")
        z_down = ops.out(xp, "gneg", "gneg") + ops.out(xn, "gpos", "zero")
        s_up = jnp.where(y > 0, r, 0) / stabilize(z_up, self.stabilizer)
        s_down = jnp.where(y < 0, r, 0) / stabilize(z_down, self.stabilizer)
        return (
            xp * ops.back(xp, "gpos", s_up)
            + xn * ops.back(xn, "gneg", s_up)
            + xp * ops.back(xp, "gneg", s_down)
            + xn * ops.back(xn, "gpos", s_down)
        )


@dataclasses.dataclass(frozen=True)
class Flat:
    """LRP-flat: relevance spread uniformly over each output's receptive field (weights and inputs 1)."""

    stabilizer: float = 1e-6

    def __call__(self, ops: LayerOps, x, r):
        # The barrier keeps XLA from evaluating L(1; 1) at compile time (tens of seconds for a
        # 224 px stem convolution); at run time it is one cheap convolution.
        ones = jax.lax.optimization_barrier(jnp.ones_like(x))
        s = r / stabilize(ops.out(ones, "ones", "zero"), self.stabilizer)
        return ops.back(ones, "ones", s)


@dataclasses.dataclass(frozen=True)
class ZBox:
    """LRP-z^B for inputs bounded by ``low <= x <= high`` (numbers, or one per channel, channels last)."""

    low: float | tuple[float, ...] = 0.0
    high: float | tuple[float, ...] = 1.0
    stabilizer: float = 1e-6

    def __call__(self, ops: LayerOps, x, r):
        bounds = (jnp.broadcast_to(jnp.asarray(v, x.dtype), x.shape) for v in (self.low, self.high))
        lo, hi = jax.lax.optimization_barrier(tuple(bounds))  # not folded at compile time (see Flat)
        z = ops.forward(x) - ops.out(lo, "pos", "pos") - ops.out(hi, "neg", "neg")
        s = r / stabilize(z, self.stabilizer)
        return x * ops.back(x, "id", s) - lo * ops.back(lo, "pos", s) - hi * ops.back(hi, "neg", s)


Rule = Epsilon | Norm | ZPlus | AlphaBeta | Gamma | Flat | ZBox
