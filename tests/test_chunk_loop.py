"""The chunk loop of the perturbation explainers (``chunk_loop=``): from Python over one jitted
chunk kernel ("host") or inside one jitted kernel ("device") — the same maps, the chunk kernel
compiled once, "auto" choosing the host loop only for gradient chunks on concrete CPU inputs —
and Score-CAM, Ablation-CAM and occlusion on the host loop against the formulas by hand in NumPy."""

import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest
from compiles import compilations, counted_chunks

import gradcam_jax as gcj
import gradcam_jax._chunking as chunking

W = nets.weights(4, c2=8)  # 8 channels at the tap
X = np.random.default_rng(12).normal(size=(2, 8, 8, 3)).astype(np.float32)
FEATURES, HEAD = nets.split_functions(W)
TAP = gcj.split_tap(FEATURES, HEAD)


def model(x):
    return HEAD(FEATURES(x))


# Each runs in 3 chunks, the last one padded: 8 channels 3 at a time (chunk_size 6 for a batch of
# 2); 16 windows (4 x 4) 6 at a time; 16 noisy masks 6 at a time; 10 masks 4 at a time. (KernelSHAP's
# stages, checked against Captum in tests/test_attribution_sampling.py, go through the same
# stacked-items host loop as occlusion's.)
RUNS = {
    "score_cam": lambda loop: gcj.score_cam(TAP, X, [0, 3], chunk_size=6, chunk_loop=loop),
    "ablation_cam": lambda loop: gcj.ablation_cam(TAP, X, None, chunk_size=6, chunk_loop=loop, relu=False),
    "occlusion": lambda loop: gcj.occlusion(model, X, 1, window=3, stride=2, chunk_size=14, chunk_loop=loop),
    "ss_cam": lambda loop: gcj.ss_cam(
        TAP, X, 2, key=jax.random.key(0), n_noise=2, noise_std=0.3, chunk_size=14, chunk_loop=loop
    ),
    "rise": lambda loop: gcj.rise(
        model, X, 1, key=jax.random.key(1), n_masks=10, cell=4, chunk_size=8, chunk_loop=loop
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(RUNS))
def test_the_host_loop_gives_the_device_loops_maps(name, monkeypatch):
    calls = counted_chunks(monkeypatch)
    device = np.asarray(RUNS[name]("device"))
    assert not calls
    host = np.asarray(RUNS[name]("host"))
    assert len(calls) == 3, calls
    auto = np.asarray(RUNS[name]("auto"))  # forward-only chunks: the device loop, even on a CPU
    assert len(calls) == 3, calls
    assert host.shape == device.shape and np.isfinite(device).all()
    np.testing.assert_allclose(host, device, rtol=1e-5, atol=1e-5 * np.abs(device).max())
    np.testing.assert_array_equal(auto, device)


def test_the_chunk_kernel_compiles_once_for_every_chunk(caplog, monkeypatch):
    # a batch of 3 (a shape no other test compiles): 8 channels, 3 at a time -> 3 calls, the last
    # padded; a second explanation compiles nothing
    x = np.random.default_rng(2).normal(size=(3, 8, 8, 3)).astype(np.float32)
    calls = counted_chunks(monkeypatch)
    with compilations(caplog, "chunk_kernel") as chunks, compilations(caplog, "score_cam_kernel") as whole:
        first = gcj.score_cam(TAP, x, 1, chunk_size=9, chunk_loop="host")
    with compilations(caplog, "") as again:
        second = gcj.score_cam(TAP, x, 1, chunk_size=9, chunk_loop="host")
    assert len(calls) == 6 and len(chunks) == 1 and not whole, (calls, chunks, whole)
    assert not again, again
    np.testing.assert_array_equal(first, second)


def test_under_jit_auto_loops_on_the_device_and_host_still_works(monkeypatch):
    expected = np.asarray(gcj.ablation_cam(TAP, X, 1, chunk_size=6, chunk_loop="device"))
    host = jax.jit(lambda x: gcj.ablation_cam(TAP, x, 1, chunk_size=6, chunk_loop="host"))(X)
    np.testing.assert_allclose(host, expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(chunking, "run_on_host", lambda *a: pytest.fail("the host loop ran under jit"))
    # Integrated Gradients' "auto" takes the host loop on concrete CPU inputs (3 chunks here), and
    # the device loop under the caller's jit.
    auto = jax.jit(lambda x: gcj.integrated_gradients(model, x, 0, steps=6, chunk_size=4))(X)
    device = gcj.integrated_gradients(model, X, 0, steps=6, chunk_size=4, chunk_loop="device")
    np.testing.assert_allclose(auto, device, rtol=1e-5, atol=1e-6)


def test_auto_runs_gradient_chunks_from_python_and_forward_chunks_on_the_device(monkeypatch):
    calls = counted_chunks(monkeypatch)
    gcj.score_cam(TAP, X, 0, chunk_size=6)  # 3 chunks of masked forwards
    gcj.occlusion(model, X, 1, window=3, stride=2, chunk_size=14)
    assert not calls
    gcj.integrated_gradients(model, X, 0, steps=6, chunk_size=4)  # 3 chunks of forward+backward
    assert len(calls) == 3
    gcj.integrated_gradients(model, X, 0, steps=6, chunk_size=12)  # one chunk: one kernel
    assert len(calls) == 3


def test_bad_chunk_loops_are_refused_before_compiling():
    for run in (RUNS["score_cam"], RUNS["ablation_cam"], RUNS["occlusion"], RUNS["rise"]):
        with pytest.raises(ValueError, match="chunk_loop='python' is not one of 'auto', 'host', 'device'"):
            run("python")
    with pytest.raises(ValueError, match="chunk_loop='host' does not combine with aug_smooth"):
        gcj.score_cam(TAP, X, 0, chunk_size=2, aug_smooth=True, chunk_loop="host")


# --------------------------------------------------------------------------------------------
# The host loop against the formulas, by hand
# --------------------------------------------------------------------------------------------

# A 2-channel toy at the image's resolution (so the masks are the channels, min-max scaled):
# A^0 = x, A^1 = relu(1 - 2x); 3 scores s_c = sum(A^0 P_c) + sum(A^1 Q_c).
RNG = np.random.default_rng(3)
TOY_X = RNG.uniform(size=(1, 4, 4, 1)).astype(np.float32)
P, Q = RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)


def toy_features_np(x):
    return np.concatenate([x, np.maximum(1 - 2 * x, 0)], axis=-1)


def toy_head_np(a):
    return np.einsum("bhw,chw->bc", a[..., 0], P) + np.einsum("bhw,chw->bc", a[..., 1], Q)


TOY_TAP = gcj.split_tap(
    lambda x: jnp.concatenate([x, jax.nn.relu(1 - 2 * x)], axis=-1),
    lambda a: jnp.einsum("bhw,chw->bc", a[..., 0], P) + jnp.einsum("bhw,chw->bc", a[..., 1], Q),
)


def minmax(m):
    return (m - m.min()) / (m.max() - m.min())


def test_score_cam_on_the_host_loop_is_the_formula(monkeypatch):
    calls = counted_chunks(monkeypatch)
    got = gcj.score_cam(
        TOY_TAP, TOY_X, 2, chunk_size=1, normalize=False, chunk_loop="host"
    )  # 1 channel per chunk
    assert len(calls) == 2
    a = toy_features_np(TOY_X.astype(np.float64))[0]
    scores = np.array([toy_head_np(toy_features_np(TOY_X * minmax(a[..., k])[None, :, :, None]))[0, 2]
                       for k in range(2)])  # fmt: skip
    alpha = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    expected = np.maximum(alpha[0] * a[..., 0] + alpha[1] * a[..., 1], 0)
    np.testing.assert_allclose(np.asarray(got)[0], expected, rtol=1e-4, atol=1e-5)


def test_ablation_cam_on_the_host_loop_is_the_formula(monkeypatch):
    calls = counted_chunks(monkeypatch)
    got = gcj.ablation_cam(TOY_TAP, TOY_X, 0, chunk_size=1, normalize=False, relu=False, chunk_loop="host")
    assert len(calls) == 2
    a = toy_features_np(TOY_X.astype(np.float64))
    y = toy_head_np(a)[0, 0]
    w = [(y - toy_head_np(a * (np.arange(2) != k))[0, 0]) / y for k in range(2)]
    np.testing.assert_allclose(
        np.asarray(got)[0], w[0] * a[0, ..., 0] + w[1] * a[0, ..., 1], rtol=1e-4, atol=1e-5
    )


def test_occlusion_on_the_host_loop_is_the_mean_drop(monkeypatch):
    calls = counted_chunks(monkeypatch)
    got = gcj.occlusion(TOY_TAP, TOY_X, 1, window=2, stride=2, baseline=0.5, chunk_size=1, chunk_loop="host")
    assert len(calls) == 4  # 2 x 2 windows, one per chunk
    y = toy_head_np(toy_features_np(TOY_X.astype(np.float64)))[0, 1]
    expected = np.zeros((4, 4))
    for i in (0, 2):
        for j in (0, 2):
            x = TOY_X.astype(np.float64).copy()
            x[0, i : i + 2, j : j + 2] = 0.5
            expected[i : i + 2, j : j + 2] = y - toy_head_np(toy_features_np(x))[0, 1]
    np.testing.assert_allclose(np.asarray(got)[0], expected, rtol=1e-4, atol=1e-5)
