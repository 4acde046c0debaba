"""SS-CAM and IS-CAM against torchcam's ``SSCAM`` / ``ISCAM`` on the test net with identical weights.

The tapped layer (``block2``, torch ``relu2``) has the input's resolution, so masks need no
upsampling and the one convention that differs — torchcam normalises a channel before
upsampling it, Score-CAM here after — does not enter. torchcam subtracts the clean image's score
before the softmax; it is the same for every channel and cancels.
"""

import jax
import nets
import numpy as np
import torch
from torchcam.methods import ISCAM, SSCAM

import gradcam_jax as gcj

H = W = 8


def problem(seed):
    w = nets.weights(seed, c2=6)
    x = np.random.default_rng(50 + seed).normal(size=(3, H, W, 3)).astype(np.float32)
    return w, x, gcj.split_tap(*nets.split_functions(w))  # the same net; the tap at block2


def torchcam_maps(extractor_cls, w, x, target, **kwargs):
    net = nets.torch_model(w, dtype=torch.float64)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))
    with extractor_cls(net, "relu2", batch_size=32, input_shape=(3, H, W), **kwargs) as extractor:
        with torch.no_grad():
            net(xt)
        return extractor([int(t) for t in target])[0].numpy()


def test_is_cam_matches_torchcam():
    w, x, tap = problem(0)
    target = np.array([0, 3, 4])
    expected = torchcam_maps(ISCAM, w, x, target, num_samples=5)
    got = np.asarray(gcj.is_cam(tap, x, target, steps=5, chunk_size=16))
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_ss_cam_matches_torchcam_in_the_small_noise_limit():
    # The two libraries draw different noise; with sigma -> 0 both are the mean of n clean passes,
    # which checks everything but the noise (masks, averaging, softmax, the final map).
    w, x, tap = problem(2)
    target = np.array([1, 1, 2])
    expected = torchcam_maps(SSCAM, w, x, target, num_samples=3, std=1e-6)
    got = np.asarray(gcj.ss_cam(tap, x, target, key=jax.random.key(0), n_noise=3, noise_std=1e-6))
    np.testing.assert_allclose(got, expected, atol=2e-4)
