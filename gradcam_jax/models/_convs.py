"""Convolutions written the way XLA:CPU runs fast; the same numbers, other platforms untouched.

:func:`conv_general_dilated` has :func:`jax.lax.conv_general_dilated`'s signature and is passed
to ``flax.linen.Conv(conv_general_dilated=...)`` by the zoo's architectures. On a GPU or TPU it
*is* ``lax.conv_general_dilated``; on a CPU (chosen when the program is lowered, with
:func:`jax.lax.platform_dependent`) two shapes that XLA:CPU lowers badly are rewritten:

* **Depthwise** (``feature_group_count`` equal to the input channels, one input channel per
  group): XLA:CPU runs a grouped convolution as a generic loop, at a few percent of what it
  reaches on a dense one (EfficientNet-Lite0's forward pass spends most of its time there).
  Here it is the sum over the ``k x k`` taps of a strided slice of the padded input times that
  tap's per-channel weight, ``y[b, i, j, c] = sum_{p, q} x_pad[b, s i + p, s j + q, c] w[p, q, 0, c]``,
  which XLA fuses into one elementwise loop.
* **A kernel larger than the map** (ResNet's 3x3 convolutions on 1x1 or 2x2 maps, at inputs of
  32-64 px): XLA's algebraic simplifier swaps the operands of such a convolution and the result
  runs as a naive loop (about 1 GFLOP/s). Here it is an explicit ``im2col``: the ``k x k``
  shifted slices concatenated on the channel axis, then one matrix product with the kernel
  reshaped to ``(k k C_in, C_out)``.

Both are exact rewrites of the same sum (only float rounding order differs), made of plain
``jax.numpy`` ops, so ``vmap`` and the guided-backprop rewrite see ordinary primitives. The
depthwise one (:mod:`._depthwise`) has its own derivative rule, whose reverse mode is a tap sum
too, because XLA:CPU runs the automatic transpose of the taps several times slower than the
forward pass; forward mode, reverse mode and their compositions all work.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax

from ._depthwise import depthwise_taps, strided_taps

__all__ = ["conv_general_dilated", "depthwise_taps", "im2col_conv"]

# flax.linen.Conv's dimension numbers for channels-last 2-D convolutions (NHWC, HWIO -> NHWC).
NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _pad_and_out(x, kernel_hw, strides, padding):
    pads = ((0, 0), *padding, (0, 0))
    x = jnp.pad(x, pads)
    out_hw = tuple((x.shape[1 + d] - kernel_hw[d]) // strides[d] + 1 for d in range(2))
    return x, out_hw


def im2col_conv(x, kernel, strides: Sequence[int], padding: Sequence[tuple[int, int]], precision=None):
    """Dense convolution as ``im2col`` and one matrix product.

    Args:
      x: ``(B, H, W, C_in)`` input.
      kernel: ``(kh, kw, C_in, C_out)``.
      strides: ``(sh, sw)``.
      padding: ``((top, bottom), (left, right))``.
      precision: passed to the matrix product.

    Returns:
      ``(B, H', W', C_out)``:
      ``y[b, i, j, o] = sum_{p, q, c} x_pad[b, sh i + p, sw j + q, c] kernel[p, q, c, o]``.

    >>> x = jnp.linspace(-1, 1, 2 * 2 * 2 * 4).reshape(2, 2, 2, 4)
    >>> w = jnp.linspace(-1, 1, 3 * 3 * 4 * 5).reshape(3, 3, 4, 5)
    >>> ref = lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=NHWC)
    >>> bool(jnp.allclose(im2col_conv(x, w, (1, 1), [(1, 1), (1, 1)]), ref, atol=1e-5))
    True
    """
    kh, kw, c_in, c_out = kernel.shape
    x, out_hw = _pad_and_out(x, (kh, kw), strides, padding)
    # Taps in (p, q) order, channels last: the row order of kernel.reshape(kh * kw * c_in, c_out).
    cols = jnp.concatenate([tap for _, _, tap in strided_taps(x, (kh, kw), strides, out_hw)], axis=-1)
    return jnp.dot(cols, kernel.reshape(kh * kw * c_in, c_out), precision=precision)


def _rewrite(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups):
    """Which CPU rewrite applies: ``"depthwise"``, ``"im2col"`` or ``None`` (keep the convolution)."""
    plain = (
        lhs.ndim == 4
        and dimension_numbers == NHWC
        and not isinstance(padding, str)
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
    )
    if not plain:
        return None
    kh, kw, c_in_per_group, c_out = rhs.shape
    if groups == lhs.shape[-1] and c_in_per_group == 1 and c_out == groups and kh * kw > 1:
        return "depthwise"
    padded = [lhs.shape[1 + d] + sum(padding[d]) for d in range(2)]
    out_hw = [(padded[d] - (kh, kw)[d]) // window_strides[d] + 1 for d in range(2)]
    small = any(o < k for o, k in zip(out_hw, (kh, kw), strict=True))
    if groups == 1 and kh * kw > 1 and small:
        return "im2col"
    return None


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """:func:`jax.lax.conv_general_dilated`, rewritten on CPU where XLA:CPU is slow (see the module).

    On other platforms, and for every shape the module's rules leave alone, this is exactly
    ``lax.conv_general_dilated`` with the same arguments.

    >>> x = jnp.ones((1, 2, 2, 8)); w = jnp.ones((3, 3, 8, 4))
    >>> conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=NHWC)[0, 0, 0]
    Array([32., 32., 32., 32.], dtype=float32)
    """
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)

    def xla_conv(lhs, rhs):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )

    rewrite = (
        None
        if kwargs
        else _rewrite(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dn, feature_group_count)
    )
    if rewrite is None:
        return xla_conv(lhs, rhs)

    def cpu_conv(lhs, rhs):
        if rewrite == "depthwise":
            return depthwise_taps(lhs, rhs, window_strides, padding)
        return im2col_conv(lhs, rhs, window_strides, padding, precision)

    return lax.platform_dependent(lhs, rhs, cpu=cpu_conv, default=xla_conv)
