"""Parity with Captum's LayerGradCam on random ReLU conv nets with identical weights.

Captum is the reference implementation of the PyTorch ecosystem; its ``LayerGradCam`` returns
the raw map ``sum_k w_k A_k`` at the layer's resolution, and with ``relu_attributions=True`` +
``LayerAttribution.interpolate`` the ReLU-ed map upsampled to the input.
"""

import captum.attr as captum_attr  # the test extras install torch==2.13.0 and captum
import jax.numpy as jnp
import nets
import numpy as np
import pytest
import torch

import gradcam_jax as gcj


def captum_map(w, x_nhwc, target, *, relu=False, size=None, mode="nearest"):
    net = nets.torch_model(w, dtype=torch.float64)
    x = torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).astype(np.float64))
    lgc = captum_attr.LayerGradCam(net, net.relu2)
    attr = lgc.attribute(x, target=torch.as_tensor(target), relu_attributions=relu)
    if size is not None:
        attr = captum_attr.LayerAttribution.interpolate(attr, size, mode)
    return attr[:, 0].detach().numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raw_map_matches_layer_grad_cam(seed):
    w = nets.weights(seed, c2=12)
    x = np.random.default_rng(100 + seed).normal(size=(4, 10, 14, 3)).astype(np.float32)
    target = np.array([0, 4, 2, 1])
    expected = captum_map(w, x, target)
    module, variables = nets.linen(w)
    tap = gcj.linen_tap(module, variables, "block2")
    got = np.asarray(gcj.grad_cam(tap, x, target, upsample=False, normalize=False, relu=False))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("mode,interp", [("nearest", "nearest"), ("bilinear", "bilinear")])
def test_upsampled_relu_map_matches_captum_interpolate(mode, interp):
    # The activation is pooled so the layer is coarser than the input and upsampling matters.
    w = nets.weights(5, c2=12)
    x = np.random.default_rng(7).normal(size=(3, 16, 16, 3)).astype(np.float32)
    target = np.array([3, 3, 0])
    pooled = nets.torch_pooled_model(w, dtype=torch.float64)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))
    attr = captum_attr.LayerGradCam(pooled, pooled.pool).attribute(
        xt, target=torch.as_tensor(target), relu_attributions=True
    )
    expected = captum_attr.LayerAttribution.interpolate(attr, (16, 16), mode)[:, 0].detach().numpy()

    tap = gcj.split_tap(*nets.pooled_split_functions(w))
    got = np.asarray(gcj.grad_cam(tap, jnp.asarray(x), target, normalize=False, interpolation=interp))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
