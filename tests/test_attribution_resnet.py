"""Captum parity on a ResNet-18: torchvision's architecture written out in torch
(``benchmarks.peers.torch_resnet``; random weights, seeded batch-norm statistics), ported to
``gradcam_jax.models.ResNet`` with the benchmark's converter (``torch_state_dict_to_flax``), both
sides in float64 (the ported model's pooled head runs in float32, as the model defines it):
IntegratedGradients with its convergence delta, GradientShap and NoiseTunnel(IG) with the same
draws, InputXGradient, DeepLift (Rescale).

That torch ResNet gives every ReLU use its own non-inplace module, as Captum's DeepLift needs.
Captum's LRP is not compared here: it has no rule for the residual additions (LRP on ResNets is
checked against zennit by ``benchmarks/compare_lrp.py``). On DeepLift through the stem's max
pool: Captum's own ``MaxPool2d`` multiplier rule (``deep_lift.maxpool``) does not act where the
pool's input is the output of a hooked ``nn.ReLU``, as in torchvision's ResNets (replacing it by
the plain gradient leaves Captum's result on this net unchanged, measured with Captum 0.9 and
torch 2.13), so Captum routes the multipliers through the pool as the gradient does, and so does
``gcj.deeplift``. Neither then sums exactly to the output's difference on this net (the gradient's
routing at a max pool is not a Rescale multiplier; 7-26% off here), so summation-to-delta is
checked on the pool-free nets of ``test_attribution_relevance.py``, not here.
"""

import captum.attr as captum_attr  # the test extras install torch==2.13.0 and captum
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gradcam_jax as gcj
from benchmarks.peers.torch_resnet import ResNet as TorchResNet
from benchmarks.peers.torch_resnet import randomize_bn
from gradcam_jax.attribution.noise import noise_draws
from gradcam_jax.attribution.path import gradient_shap_draws
from gradcam_jax.models.resnet import ResNet, resnet_for_torch, torch_state_dict_to_flax

SIZE, NCLS = 32, 10
X = np.random.default_rng(21).normal(size=(2, SIZE, SIZE, 3))
BASE = 0.1 * np.random.default_rng(22).normal(size=(2, SIZE, SIZE, 3))  # no ties at the max pool
torch.manual_seed(0)
TORCH_NET = randomize_bn(TorchResNet(18, num_classes=NCLS), seed=1).double().eval()


def port(net):
    """``x -> logits`` of the ported model in float64 (call inside ``jax.enable_x64``)."""
    module = resnet_for_torch(net, dtype=jnp.float64)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), torch_state_dict_to_flax(net))
    return jax.tree_util.Partial(apply_model, module, variables)


def apply_model(module, variables, x):
    return module.apply(variables, x)


def nchw(a):
    return torch.from_numpy(np.asarray(a, np.float64).transpose(0, 3, 1, 2).copy())


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def rel_err(got, expected):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape
    return np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12)


def close(got, expected, tol=1e-4):
    err = rel_err(got, expected)
    assert err <= tol, f"max relative difference {err:.2e} > {tol}"


@pytest.fixture(scope="module")
def fn():
    with jax.enable_x64(True):
        yield port(TORCH_NET)


@pytest.fixture(scope="module")
def target():
    return np.argsort(TORCH_NET(nchw(X)).detach().numpy(), -1)[:, -2]  # the runner-up class


def test_the_ported_resnet18_gives_torchs_logits(fn):
    assert isinstance(resnet_for_torch(TORCH_NET), ResNet) and resnet_for_torch(TORCH_NET).stage_sizes == (
        2,
        2,
        2,
        2,
    )
    with jax.enable_x64(True):
        close(jax.jit(fn)(jnp.asarray(X)), TORCH_NET(nchw(X)).detach().numpy(), 1e-6)


def test_integrated_gradients_and_delta_match_captum(fn, target):
    expected, delta = captum_attr.IntegratedGradients(TORCH_NET).attribute(
        nchw(X), nchw(BASE), target=torch.as_tensor(target), n_steps=5, return_convergence_delta=True
    )
    with jax.enable_x64(True):
        got, got_delta = gcj.integrated_gradients(
            fn, X, target, baseline=BASE, steps=5, return_delta=True, chunk_size=6
        )
    close(got, nhwc(expected))
    scale = np.abs(TORCH_NET(nchw(X)).detach().numpy()).max()
    np.testing.assert_allclose(np.asarray(got_delta), delta.numpy(), atol=1e-4 * scale)


def test_input_x_gradient_matches_captum(fn, target):
    expected = captum_attr.InputXGradient(TORCH_NET).attribute(nchw(X), target=torch.as_tensor(target))
    with jax.enable_x64(True):
        close(gcj.input_x_gradient(fn, X, target), nhwc(expected))


def test_gradient_shap_matches_captum_with_the_same_draws(fn, target, monkeypatch):
    s, stdev = 3, 0.1
    baselines = 0.2 * np.random.default_rng(5).normal(size=(2, SIZE, SIZE, 3))
    key = jax.random.key(7)
    with jax.enable_x64(True):
        got = gcj.expected_gradients(fn, X, target, baselines=baselines, key=key, n_samples=s, stdev=stdev)
        idx, alpha, noise = (
            np.asarray(v) for v in gradient_shap_draws(key, 2, s, 2, X.shape[1:], stdev, jnp.float64)
        )
    # Captum's draws, example-major: baseline indices, path points, noise.
    monkeypatch.setattr(np.random, "choice", lambda n, size: idx.reshape(-1))
    monkeypatch.setattr(np.random, "uniform", lambda lo, hi, size: alpha.reshape(-1))
    monkeypatch.setattr(torch, "normal", lambda mean, std: nchw(noise.reshape((-1,) + X.shape[1:])))
    expected = captum_attr.GradientShap(TORCH_NET).attribute(
        nchw(X), nchw(baselines), n_samples=s, stdevs=stdev, target=torch.as_tensor(target)
    )
    close(got, nhwc(expected))


def test_noise_tunnel_over_integrated_gradients_matches_captum(fn, target, monkeypatch):
    key, n, stdev = jax.random.key(2), 2, 0.2
    with jax.enable_x64(True):
        got = gcj.noise_tunnel(
            gcj.integrated_gradients, fn, X, target, key=key, n_samples=n, stdev=stdev, relative=False,
            kind="smoothgrad_sq", steps=3,
        )  # fmt: skip
        noise = np.asarray(noise_draws(key, jnp.asarray(X), n, stdev, relative=False))  # (S, B, ...)
    flat = np.moveaxis(noise, 0, 1).reshape((-1,) + X.shape[1:])  # example-major, as Captum repeats
    monkeypatch.setattr(torch, "normal", lambda mean, std: nchw(flat))
    nt = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(TORCH_NET))
    expected = nt.attribute(
        nchw(X),
        nt_type="smoothgrad_sq",
        nt_samples=n,
        stdevs=stdev,
        target=torch.as_tensor(target),
        n_steps=3,
    )
    close(got, nhwc(expected))


def test_deeplift_matches_captum(fn, target):
    expected = captum_attr.DeepLift(TORCH_NET).attribute(nchw(X), nchw(BASE), target=torch.as_tensor(target))
    with jax.enable_x64(True):
        close(gcj.deeplift(fn, X, target, baseline=BASE), nhwc(expected))
