"""Integrated Gradients, Expected Gradients, Input x Gradient and the noise tunnel against Captum
(float64, the same weights, the same random draws passed in) and against their axioms."""

import captum.attr as captum_attr  # the test extras install torch==2.13.0 and captum
import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest
import torch
from compiles import compilations, counted_chunks

import gradcam_jax as gcj
import gradcam_jax._chunking as chunking
from gradcam_jax.attribution import noise as tunnel
from gradcam_jax.attribution import pair_paths, path
from gradcam_jax.attribution.noise import noise_draws
from gradcam_jax.attribution.path import gradient_shap_draws

W = nets.weights(3, c2=8)
X = np.random.default_rng(11).normal(size=(2, 8, 8, 3)).astype(np.float32)
T = np.array([1, 3])


def jax_net(x):
    features, head = nets.split_functions(W)
    return head(features(x))


TORCH_NET = nets.torch_model(W, dtype=torch.float64)


def nchw(a):
    return torch.from_numpy(np.asarray(a, np.float64).transpose(0, 3, 1, 2).copy())


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def close(got, expected, tol=1e-4):
    """Max difference relative to the reference's largest magnitude."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape
    err = np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12)
    assert err <= tol, f"max relative difference {err:.2e} > {tol}"


def captum_ig(method, baseline, steps=6):
    ig = captum_attr.IntegratedGradients(TORCH_NET)
    expected, delta = ig.attribute(
        nchw(X), nchw(baseline), target=torch.as_tensor(T), n_steps=steps, method=method,
        return_convergence_delta=True,
    )  # fmt: skip
    return nhwc(expected), delta.numpy()


def check_delta(got_delta, delta):
    outputs = TORCH_NET(nchw(X))[np.arange(2), T].detach().numpy()
    np.testing.assert_allclose(np.asarray(got_delta), delta, atol=1e-4 * np.abs(outputs).max())


@pytest.mark.parametrize("chunk_loop", ["auto", "device"])
@pytest.mark.parametrize("method", gcj.attribution.path.QUADRATURES)
def test_integrated_gradients_matches_captum(method, chunk_loop):
    # two chunks of 3 steps: "auto" on this CPU runs them from Python, "device" in a lax.scan
    baseline = 0.1 * np.ones_like(X)
    expected, delta = captum_ig(method, baseline)
    got, got_delta = gcj.integrated_gradients(
        jax_net, X, T, baseline=baseline, steps=6, method=method, return_delta=True, chunk_size=6,
        chunk_loop=chunk_loop,
    )  # fmt: skip
    close(got, expected)
    check_delta(got_delta, delta)


def test_the_host_loop_compiles_one_chunk_kernel_for_every_chunk(caplog, monkeypatch):
    # 9 steps in chunks of 2 (the last one padded): 5 calls of one compiled chunk kernel, no scan
    baseline = 0.2 * np.ones_like(X)
    expected, delta = captum_ig("riemann_trapezoid", baseline, steps=9)
    calls = counted_chunks(monkeypatch)
    with compilations(caplog, "chunk_kernel") as chunks, compilations(caplog, "path_kernel") as scans:
        got, got_delta = gcj.integrated_gradients(
            jax_net, X, T, baseline=baseline, steps=9, method="riemann_trapezoid", return_delta=True,
            chunk_size=4,
        )  # fmt: skip
    assert calls == [path.PATH] * 5 and len(chunks) == 1 and not scans, (calls, chunks, scans)
    close(got, expected)
    check_delta(got_delta, delta)


@pytest.mark.parametrize("chunk_loop", ["auto", "host"])
def test_under_an_outer_jit_auto_keeps_the_scan(chunk_loop, monkeypatch):
    baseline = 0.1 * np.ones_like(X)
    expected, delta = captum_ig("gausslegendre", baseline)
    if chunk_loop == "auto":
        monkeypatch.setattr(chunking, "run_on_host", lambda *a: pytest.fail("the host loop ran under jit"))

    @jax.jit
    def explain(x):
        return gcj.integrated_gradients(
            jax_net, x, T, baseline=baseline, steps=6, return_delta=True, chunk_size=2, chunk_loop=chunk_loop
        )

    got, got_delta = explain(X)
    close(got, expected)
    check_delta(got_delta, delta)


def test_completeness_error_falls_with_steps():
    errors = []
    for steps in (2, 8, 32):
        _, delta = gcj.integrated_gradients(
            jax_net, X, T, steps=steps, method="riemann_trapezoid", return_delta=True
        )
        errors.append(float(np.abs(np.asarray(delta)).max()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.25 * errors[0], errors  # the ReLU kinks make it O(1/steps), not O(1/steps^2)


def test_k_targets_and_chunks_agree_with_one_target_at_a_time():
    both = gcj.integrated_gradients(jax_net, X, [0, 2], steps=6, chunk_size=4)
    for k, c in enumerate([0, 2]):
        one = gcj.integrated_gradients(jax_net, X, c, steps=6)
        close(both[:, k], one, 1e-5)


def test_input_x_gradient_matches_captum():
    expected = captum_attr.InputXGradient(TORCH_NET).attribute(nchw(X), target=torch.as_tensor(T))
    close(gcj.input_x_gradient(jax_net, X, T), nhwc(expected))


@pytest.mark.parametrize("chunk_size", [None, 2])  # one chunk (one kernel); 4 chunks (from Python)
def test_expected_gradients_matches_gradient_shap_with_the_same_draws(monkeypatch, chunk_size):
    s, stdev = 4, 0.2
    baselines = np.random.default_rng(5).normal(size=(3, 8, 8, 3)).astype(np.float32)
    key = jax.random.key(7)
    calls = counted_chunks(monkeypatch)
    got = gcj.expected_gradients(
        jax_net, X, T, baselines=baselines, key=key, n_samples=s, stdev=stdev, chunk_size=chunk_size
    )
    assert calls == ([] if chunk_size is None else [path.SAMPLED] * 4)
    idx, alpha, noise = (
        np.asarray(v) for v in gradient_shap_draws(key, 2, s, 3, X.shape[1:], stdev, X.dtype)
    )
    # Captum draws: baseline indices (np.random.choice), path points (np.random.uniform), noise
    # (torch.normal), all in the order example-major, sample-minor.
    monkeypatch.setattr(np.random, "choice", lambda n, size: idx.reshape(-1))
    monkeypatch.setattr(np.random, "uniform", lambda lo, hi, size: alpha.reshape(-1).astype(np.float64))
    monkeypatch.setattr(torch, "normal", lambda mean, std: nchw(noise.reshape((-1,) + X.shape[1:])))
    expected = captum_attr.GradientShap(TORCH_NET).attribute(
        nchw(X), nchw(baselines), n_samples=s, stdevs=stdev, target=torch.as_tensor(T)
    )
    close(got, nhwc(expected))


def _captum_noise(monkeypatch, key, n, stdev):
    noise = np.asarray(noise_draws(key, jnp.asarray(X), n, stdev, relative=False))  # (S, B, ...)
    flat = np.moveaxis(noise, 0, 1).reshape((-1,) + X.shape[1:])  # example-major, as Captum repeats
    monkeypatch.setattr(torch, "normal", lambda mean, std: nchw(flat))


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_over_saliency_matches_captum(monkeypatch, kind):
    # two chunks (2 + 1 padded) of noisy copies: run from Python over one chunk kernel on this CPU
    key, n, stdev = jax.random.key(1), 3, 0.3
    calls = counted_chunks(monkeypatch)
    got = gcj.noise_tunnel(
        gcj.gradients, jax_net, X, T, key=key, n_samples=n, stdev=stdev, relative=False, kind=kind,
        chunk_size=2,
    )  # fmt: skip
    assert calls == [tunnel.NOISE] * 2
    _captum_noise(monkeypatch, key, n, stdev)
    nt = captum_attr.NoiseTunnel(captum_attr.Saliency(TORCH_NET))
    expected = nt.attribute(
        nchw(X), nt_type=kind, nt_samples=n, stdevs=stdev, target=torch.as_tensor(T), abs=False
    )
    close(got, nhwc(expected))


def test_noise_tunnel_over_integrated_gradients_matches_captum(monkeypatch):
    key, n, stdev = jax.random.key(2), 2, 0.2
    got = gcj.noise_tunnel(
        gcj.integrated_gradients, jax_net, X, T, key=key, n_samples=n, stdev=stdev, relative=False,
        chunk_size=1, chunk_loop="device", steps=4,
    )  # fmt: skip
    _captum_noise(monkeypatch, key, n, stdev)
    nt = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(TORCH_NET))
    expected = nt.attribute(nchw(X), nt_samples=n, stdevs=stdev, target=torch.as_tensor(T), n_steps=4)
    close(got, nhwc(expected))


def test_noise_tunnel_over_layer_grad_cam_matches_captum(monkeypatch):
    key, n, stdev = jax.random.key(3), 3, 0.25
    tap = gcj.split_tap(*nets.split_functions(W))
    got = gcj.noise_tunnel(
        gcj.grad_cam, tap, X, T, key=key, n_samples=n, stdev=stdev, relative=False, kind="vargrad",
        upsample=False, normalize=False, relu=False,
    )  # fmt: skip
    _captum_noise(monkeypatch, key, n, stdev)
    nt = captum_attr.NoiseTunnel(captum_attr.LayerGradCam(TORCH_NET, TORCH_NET.relu2))
    expected = nt.attribute(nchw(X), nt_type="vargrad", nt_samples=n, stdevs=stdev, target=torch.as_tensor(T))
    close(got, expected[:, 0].detach().numpy())


def test_smooth_grad_is_the_noise_tunnel():
    key = jax.random.key(4)
    sg = gcj.smooth_grad(jax_net, X, T, key=key, n_samples=4, noise_level=0.1, method="guided_backprop")
    nt = gcj.noise_tunnel(gcj.guided_backprop, jax_net, X, T, key=key, n_samples=4, stdev=0.1)
    np.testing.assert_array_equal(np.asarray(sg), np.asarray(nt))


def test_blur_ig_host_loop_is_the_scan(monkeypatch):
    # PAIR's parity for blur_ig (tests/test_attribution_pair.py, 3 chunks) runs the host loop
    calls = counted_chunks(monkeypatch)
    host = gcj.blur_ig(jax_net, X, T, max_sigma=4, steps=5, chunk_size=4)
    scan = gcj.blur_ig(jax_net, X, T, max_sigma=4, steps=5, chunk_size=4, chunk_loop="device")
    assert calls == [pair_paths.BLUR] * 3
    close(host, scan, 1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="method='simpson'"):
        gcj.integrated_gradients(jax_net, X, T, method="simpson")
    with pytest.raises(ValueError, match="baseline of shape"):
        gcj.integrated_gradients(jax_net, X, T, baseline=np.zeros((5, 5)))
    with pytest.raises(TypeError, match="key= is required"):
        gcj.integrated_gradients(jax_net, X, T, baseline="uniform")
    with pytest.raises(ValueError, match="baselines must be"):
        gcj.expected_gradients(jax_net, X, T, baselines=np.zeros((8, 8, 3)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="kind='mean'"):
        gcj.noise_tunnel(gcj.gradients, jax_net, X, T, key=jax.random.key(0), kind="mean")
    with pytest.raises(ValueError, match="out of range"):
        gcj.integrated_gradients(jax_net, X, 9)
    with pytest.raises(ValueError, match="chunk_loop='python' is not one of"):
        gcj.integrated_gradients(jax_net, X, T, chunk_loop="python")
