"""Depthwise convolution as a sum over the kernel's taps, with a backward pass of the same kind.

XLA:CPU runs a grouped convolution as a generic loop; :mod:`._convs` runs a depthwise one
(``feature_group_count`` equal to the channels) as a sum over the kernel's taps instead,

    ``y[b, i, j, c] = sum_{p, q} x_pad[b, s_h i + p, s_w j + q, c] w[p, q, 0, c]``,

which XLA fuses into one elementwise loop. Left to ``jax.grad``, the input gradient of that sum
is the transpose of every strided slice — a padded (for stride 2, interior-padded) copy of the
cotangent per tap, all summed in one fused loop — and XLA:CPU runs that loop many times slower
than the forward pass for a 5x5 kernel (``python -m benchmarks.bench_cpu_ops --backward``). So
:func:`depthwise_taps` has its own derivative rule, written so that reverse mode gets

* **the input gradient** as a tap sum (the transpose of a depthwise convolution is a depthwise
  convolution with the kernel flipped):
  ``dx[b, u, v, c] = sum_{s i + p = u + lo, s j + q = v + lo'} g[b, i, j, c] w[p, q, 0, c]``.
  For stride 1 it is the tap sum of ``g`` with ``w[::-1, ::-1]`` and pads
  ``(k - 1 - lo, k - 1 - hi)``. For stride ``s`` the rows ``u = s m + a`` of each phase ``a``
  only meet the taps ``p = a + lo (mod s)``, so each of the ``s^2`` phases is a stride-1 tap sum
  over ``g`` with about ``k^2 / s^2`` taps, and the phases are interleaved (polyphase): the work
  of the forward pass, not the ``s^2`` times more of a sum over the zero-interleaved cotangent;
* **the kernel gradient** ``dw[p, q, 0, c] = sum_{b, i, j} x_pad[b, s i + p, s j + q, c] g[b, i, j, c]``,
  one reduction per tap (what ``jax.grad`` of the tap sum gives anyway: the rule's tangent in
  the kernel is the tap sum itself).

The rule is a ``jax.custom_jvp`` whose tangent in ``x`` is :func:`jax.linear_transpose` of
:func:`depthwise_input_grad`: ``jax.grad`` transposes that tangent back into
:func:`depthwise_input_grad` itself, while ``jax.jvp`` / ``jax.jacfwd`` still work (with the
padded copies as their tangent). Everything is ``jax.numpy``, so gradients of gradients work
too. Both gradients are sums of the same products as ``lax.conv_general_dilated``'s (float
rounding order aside).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = [
    "depthwise_taps",
    "tap_sum",
    "strided_taps",
    "depthwise_input_grad",
]


def _pad_hw(x, padding):
    """``x`` padded with zeros on its two spatial axes (negative pads crop)."""
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))


def _out_hw(x_shape, kernel_hw, strides, padding) -> tuple[int, int]:
    return tuple((x_shape[1 + d] + sum(padding[d]) - kernel_hw[d]) // strides[d] + 1 for d in range(2))


def strided_taps(x, kernel_hw, strides, out_hw):
    """Every ``(p, q)`` tap of a padded NHWC input: the slice ``x[:, p::s, q::s, :]`` of the output's size."""
    (kh, kw), (sh, sw), (oh, ow) = kernel_hw, strides, out_hw
    for p in range(kh):
        for q in range(kw):
            limit = (x.shape[0], p + (oh - 1) * sh + 1, q + (ow - 1) * sw + 1, x.shape[3])
            yield p, q, lax.slice(x, (0, p, q, 0), limit, (1, sh, sw, 1))


def tap_sum(x, kernel, strides, padding):
    """The forward pass of :func:`depthwise_taps`: plain ``jax.numpy`` (``jax.grad`` would transpose it).

    The padded input is one array (XLA stores it once, with its producer, a BatchNorm and ReLU6,
    fused in) and every tap a strided slice of it, all summed in one fused loop.
    """
    kernel_hw = kernel.shape[:2]
    out_hw = _out_hw(x.shape, kernel_hw, strides, padding)
    out = None
    for p, q, tap in strided_taps(_pad_hw(x, padding), kernel_hw, strides, out_hw):
        term = tap * kernel[p, q, 0]
        out = term if out is None else out + term
    return out


def _phases(k: int, s: int, lo: int, n: int, o: int):
    """One axis of the polyphase input gradient.

    Returns ``(m, taps, before, after)``: ``m = ceil(n / s)`` rows per phase; ``taps[a]`` the
    ``(p, d)`` pairs of phase ``a`` (tap ``p`` reads ``g[m' + d]`` for row ``u = s m' + a``, from
    ``s i + p = u + lo``); and the zero rows the cotangent needs before and after so that every
    phase's slice ``g[d : d + m]`` is in range.
    """
    m = -(-n // s)
    taps = [[(p, (a + lo - p) // s) for p in range(k) if (a + lo - p) % s == 0] for a in range(s)]
    shifts = [d for phase in taps for _, d in phase] or [0]
    return m, taps, max(0, -min(shifts)), max(0, m - 1 + max(shifts) - (o - 1))


def depthwise_input_grad(g, kernel, strides, padding, in_hw):
    """Input cotangent of :func:`depthwise_taps`: ``(B, H', W', C)`` cotangent -> ``(B, H, W, C)``.

    See the module for the formula (stride 1: a depthwise convolution with the flipped kernel;
    stride ``s``: ``s^2`` phases interleaved).
    """
    kh, kw = kernel.shape[:2]
    out_hw = g.shape[1:3]
    if tuple(strides) == (1, 1):
        pads = tuple(
            (k - 1 - lo, n + k - 1 - o - (k - 1 - lo))
            for k, (lo, _), n, o in zip((kh, kw), padding, in_hw, out_hw, strict=True)
        )
        return tap_sum(g, kernel[::-1, ::-1], (1, 1), pads)
    (mh, rows, top, bottom), (mw, cols, left, right) = (
        _phases(k, s, pad[0], n, o)
        for k, s, pad, n, o in zip((kh, kw), strides, padding, in_hw, out_hw, strict=True)
    )
    gp = _pad_hw(g, ((top, bottom), (left, right)))
    phases = []
    for row_taps in rows:
        for col_taps in cols:
            acc = None
            for p, dp in row_taps:
                for q, dq in col_taps:
                    start = (0, top + dp, left + dq, 0)
                    limit = (g.shape[0], top + dp + mh, left + dq + mw, g.shape[3])
                    term = lax.slice(gp, start, limit) * kernel[p, q, 0]
                    acc = term if acc is None else acc + term
            if acc is None:  # a phase no tap reaches (stride larger than the kernel)
                acc = jnp.zeros((g.shape[0], mh, mw, g.shape[3]), jnp.result_type(g, kernel))
            phases.append(acc)
    # (s_h s_w, B, m_h, m_w, C) -> (B, m_h, s_h, m_w, s_w, C): row s m + a of phase a.
    stacked = jnp.stack(phases).reshape(*strides, g.shape[0], mh, mw, g.shape[3])
    dx = stacked.transpose(2, 3, 0, 4, 1, 5).reshape(g.shape[0], mh * strides[0], mw * strides[1], -1)
    return dx[:, : in_hw[0], : in_hw[1]]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, padding):
    return tap_sum(x, kernel, strides, padding)


def _depthwise_jvp(strides, padding, primals, tangents):
    """Tangent ``T(x_dot) + tap_sum(x, kernel_dot)``, ``T`` the transpose of :func:`depthwise_input_grad`.

    Symbolic zeros stay symbolic: with ``jax.grad`` in ``x`` only (the weights are constants of
    the explainers' programs), no tap sum of a zero kernel tangent is ever computed.
    """
    x, kernel = primals
    x_dot, kernel_dot = tangents
    y = tap_sum(x, kernel, strides, padding)
    y_dot = None
    if not isinstance(x_dot, SymbolicZero):

        def adjoint(g):
            return depthwise_input_grad(g, kernel, strides, padding, x.shape[1:3])

        transpose = jax.linear_transpose(adjoint, jax.ShapeDtypeStruct(y.shape, y.dtype))
        (y_dot,) = transpose(x_dot.astype(y.dtype))
    if not isinstance(kernel_dot, SymbolicZero):
        term = tap_sum(x, kernel_dot, strides, padding).astype(y.dtype)
        y_dot = term if y_dot is None else y_dot + term
    return y, jnp.zeros_like(y) if y_dot is None else y_dot


_depthwise.defjvp(_depthwise_jvp, symbolic_zeros=True)


def depthwise_taps(x, kernel, strides: Sequence[int], padding: Sequence[tuple[int, int]]):
    """Depthwise convolution as a sum over the kernel's taps, with a tap-sum backward pass.

    Args:
      x: ``(B, H, W, C)`` input.
      kernel: ``(kh, kw, 1, C)`` weights (flax's layout for ``feature_group_count=C``).
      strides: ``(sh, sw)``.
      padding: ``((top, bottom), (left, right))``.

    Returns:
      ``(B, H', W', C)``: ``y[b, i, j, c] = sum_{p, q} x_pad[b, sh i + p, sw j + q, c] kernel[p, q, 0, c]``,
      equal to ``lax.conv_general_dilated(..., feature_group_count=C)``, and so are its
      derivatives (the module says how its reverse mode is computed).

    >>> x = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 5, 3) / 10
    >>> w = jnp.linspace(-1, 1, 3 * 3 * 3).reshape(3, 3, 1, 3)
    >>> dn = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    >>> ref = lax.conv_general_dilated(x, w, (2, 2), [(1, 1), (1, 1)], dimension_numbers=dn,
    ...                                feature_group_count=3)
    >>> bool(jnp.allclose(depthwise_taps(x, w, (2, 2), [(1, 1), (1, 1)]), ref, atol=1e-5))
    True
    """
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _depthwise(x, kernel, strides, padding)
