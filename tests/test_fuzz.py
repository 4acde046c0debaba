"""Fuzzing every public explainer and a few metrics with hypothesis (issue 19).

Each example draws an input (spatial shape, dtype among uint8, float16, bfloat16, float32 and
int32, layout NHWC or NCHW, batch size 0, 1 or 3, NaN in one pixel or not), a model (a small
conv net written in JAX, with or without a NaN class score) and a target (None, Python ints of
any size, int32/int64 arrays of the right and wrong shapes, lists, callables with right and
wrong shapes or an int result), and asserts the invariant:

* when the arguments are valid — decided here, from the documented rules, without the library
  — the result has the documented shape and is all NaN for exactly the examples (or
  example-targets) whose explained score is NaN, finite elsewhere: NaN is never laundered into
  zeros; Grad-CAM and plain gradients also equal a NumPy transcription of the net's;
* otherwise the call raises a ``ValueError`` or ``TypeError`` from gradcam_jax's own code whose
  message names an argument (``x``, ``target``, ``layout``; ``images``, ``maps``);
* never another exception, never a wrong shape.

The examples are derandomised (the same ones on every run). CI runs 200 explainer examples and
100 metric examples (about 40 s on two CPU cores); for a longer local run set
``GCJ_FUZZ_EXAMPLES`` (examples of the explainer test; the metric test runs half as many), e.g.
``GCJ_FUZZ_EXAMPLES=3000 pytest tests/test_fuzz.py`` (about 6 minutes). Only two shapes and
four nets are used, so the kernels compile a bounded number of times.
"""

import os
import re
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy import stats

import gradcam_jax as gcj
from gradcam_jax import metrics

EXAMPLES = int(os.environ.get("GCJ_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------ the net, and its NumPy twin

NCLS, F = 5, 4
_R = np.random.default_rng(0)
W1 = _R.normal(size=(3, F)).astype(np.float32)
B1 = (_R.normal(size=(F,)) * 0.3).astype(np.float32)
W2 = _R.normal(size=(F, NCLS)).astype(np.float32)
B2 = (_R.normal(size=(NCLS,)) * 0.3).astype(np.float32)
NAN_CLASS = 4
NAN_BIAS = np.where(np.arange(NCLS) == NAN_CLASS, np.nan, 0.0).astype(np.float32)


def make_net(channels_first: bool, nan_class: bool):
    """``features: x -> A`` (per-pixel dense, ReLU, 2 x 2 average pool; (B, h, w, F)) and
    ``head: A -> scores`` (spatial mean, dense), for NHWC or NCHW inputs of any floating dtype."""

    def features(x):
        x = x.astype(jnp.float32)  # the model's own preprocessing
        if channels_first:
            x = jnp.moveaxis(x, 1, -1)
        r = jax.nn.relu(jnp.einsum("bhwc,cf->bhwf", x, W1) + B1)
        b, h, w, f = r.shape
        return r.reshape(b, h // 2, 2, w // 2, 2, f).mean(axis=(2, 4))

    def head(a):
        scores = a.mean(axis=(1, 2)) @ W2 + B2
        return scores + NAN_BIAS if nan_class else scores

    return features, head


NETS = {(cf, nan): make_net(cf, nan) for cf in (False, True) for nan in (False, True)}
TAPS = {k: gcj.split_tap(*v) for k, v in NETS.items()}
MODELS = {k: (lambda f, h: lambda x: h(f(x)))(*v) for k, v in NETS.items()}


def np_forward(x_nhwc, nan_class):
    """``(z, A, scores)`` in float64 for a channels-last float32 batch."""
    z = x_nhwc.astype(np.float64) @ W1 + B1
    b, hh, ww, _ = z.shape
    a = np.maximum(z, 0).reshape(b, hh // 2, 2, ww // 2, 2, F).mean(axis=(2, 4))
    scores = a.mean(axis=(1, 2)) @ W2 + B2
    return z, a, scores + NAN_BIAS if nan_class else scores


def linear_weights(n_in, n_out):
    """``(n_out, n_in)``: a linear resize with half-pixel centres, edges clamped."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), lo), 1 - (pos - lo))
    np.add.at(weights, (np.arange(n_out), np.minimum(lo + 1, n_in - 1)), pos - lo)
    return weights


def np_upsample(m, size):
    """Bilinear resize of the last two axes of ``m`` to ``size``."""
    return np.einsum(
        "yh,xw,...hw->...yx", linear_weights(m.shape[-2], size[0]), linear_weights(m.shape[-1], size[1]), m
    )


def np_grad_cam(a, cls, size):
    """Grad-CAM of the net: ``dA`` of class c is ``W2[:, c] / (h w)`` everywhere. ``(B, K, H, W)``
    and the raw maps' spans (to skip comparing maps that normalisation would make noise of)."""
    h, w = a.shape[1:3]
    weights = W2.T.astype(np.float64)[cls] / (h * w)  # (B, K, F)
    raw = np.maximum(np.einsum("bkf,bhwf->bkhw", weights, a), 0)
    up = np_upsample(raw, size)
    lo, hi = up.min(axis=(-2, -1), keepdims=True), up.max(axis=(-2, -1), keepdims=True)
    span = hi - lo
    return np.where(span > 0, (up - lo) / np.where(span > 0, span, 1), 0.0), span[..., 0, 0]


def np_gradients(z, cls, hw):
    """Input gradients of class c: ``W1 (1[z > 0] * W2[:, c]) / (H W)`` per pixel: ``(B, K, H, W, 3)``."""
    g = (z[:, None] > 0) * W2.T.astype(np.float64)[cls][:, :, None, None, :]  # (B, K, H, W, F)
    return g @ W1.T.astype(np.float64) / hw


# ------------------------------------------------------------------ drawing cases

DTYPES = {
    "uint8": np.uint8,
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float32": np.float32,
    "int32": np.int32,
}
HUGE = [2**31, 2**32 + 3, -(2**32), 2**63 - 1, 2**70, -(2**70)]
CALLABLES = {
    "column": lambda c: lambda s: s[:, c],
    "columns": lambda c: lambda s: s[:, jnp.array([c, (c + 1) % NCLS])],
    "first_row": lambda c: lambda s: s[:1, c],
    "argmax": lambda c: lambda s: jnp.argmax(s, axis=-1),
    "rank3": lambda c: lambda s: s[..., None],
    "scalar": lambda c: lambda s: s[:, c].sum(),
}


@st.composite
def targets(draw, batch):
    # Valid targets more often than invalid ones: most examples should reach a computation.
    kind = draw(st.sampled_from(["none", "int", "int", "huge", "list", "list", "array", "array", "callable"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-2, NCLS + 1))
    if kind == "huge":
        return draw(st.sampled_from(HUGE))
    if kind == "list":
        return draw(st.lists(st.integers(-1, NCLS), min_size=1, max_size=3))
    if kind == "callable":
        name = draw(st.sampled_from(sorted(CALLABLES)))
        return CALLABLES[name](draw(st.integers(0, NCLS - 1)))
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    shape = draw(st.sampled_from([(batch,), (batch, 2), (batch + 1,), (), (batch, 0), (batch, 1, 1)]))
    arr = np.full(shape, draw(st.integers(-1, NCLS)), dtype)
    if arr.size and draw(st.booleans()):
        arr.reshape(-1)[0] = np.int64(2**40) if dtype == np.int64 else np.iinfo(np.int32).max
    return arr


@st.composite
def cases(draw):
    batch = draw(st.sampled_from([0, 1, 1, 3, 3, 3]))
    size = draw(st.sampled_from([(4, 4), (4, 6)]))
    dtype = draw(st.sampled_from(["float32", "float32", "float16", "bfloat16", "uint8", "int32"]))
    channels_first = draw(st.booleans())
    nan_input = draw(st.booleans())
    nan_class = draw(st.booleans())
    seed = draw(st.integers(0, 3))
    x = np.random.default_rng(seed).normal(size=(batch, *size, 3))
    if dtype in ("uint8", "int32"):
        x = np.abs(x) * 50
    elif nan_input and batch:
        x[0, 1, 2, 0] = np.nan
    x = x.astype(DTYPES[dtype])
    x_nhwc = x.astype(np.float32)
    if channels_first:
        x = np.moveaxis(x, -1, 1)
    return {
        "x": np.ascontiguousarray(x),
        "x_nhwc": x_nhwc,
        "dtype": dtype,
        "key": (channels_first, nan_class),
        "target": draw(targets(batch)),
        "size": size,
    }


# ------------------------------------------------------------------ what should happen

REFUSE = (ValueError, TypeError)


def expected_classes(target, batch, scores, *, metric=False):
    """``(classes (B, K), multi)`` for a valid target, or the exception types it should raise."""
    problems = set()
    if batch == 0:
        problems.add(ValueError)
    if target is None:
        cls = np.argmax(scores, axis=-1)[:, None] if batch else np.zeros((0, 1), int)
        return problems if problems else (cls, False)
    if callable(target):
        if metric:
            return problems | {ValueError}
        y = jax.eval_shape(target, jax.ShapeDtypeStruct((batch, NCLS), jnp.float32))
        if y.ndim not in (1, 2) or y.shape[0] != batch:
            return problems | {ValueError}
        if not jnp.issubdtype(y.dtype, jnp.floating):
            return problems | {TypeError}
        if problems:
            return problems
        cols = np.asarray(target(jnp.broadcast_to(jnp.arange(NCLS, dtype=jnp.float32), (batch, NCLS))))
        return cols.astype(int).reshape(batch, -1), y.ndim == 2
    if metric and isinstance(target, list):
        target = np.asarray(target)  # for the metrics a list holds one class per image
    arr = np.asarray(target, object if isinstance(target, int) else None)
    multi = isinstance(target, list) or arr.ndim == 2
    if isinstance(target, list):
        arr = np.broadcast_to(np.asarray(target, object), (batch, len(target)))
    elif arr.ndim == 0:
        arr = np.broadcast_to(arr, (batch,))
    if arr.ndim not in (1, 2) or arr.shape[0] != batch or (arr.ndim == 2 and (arr.shape[1] == 0 or metric)):
        return problems | {ValueError}
    values = [int(v) for v in arr.reshape(-1)]
    if values and (min(values) < 0 or max(values) >= NCLS):
        return problems | {ValueError}
    if problems:
        return problems
    return np.asarray(values, int).reshape(batch, -1), multi


def check_refusal(error, names):
    """A ValueError/TypeError raised in gradcam_jax whose message names one of ``names``."""
    assert isinstance(error, REFUSE), f"{type(error).__name__} is not a refusal: {error}"
    frame = traceback.extract_tb(error.__traceback__)[-1]
    assert f"{os.sep}gradcam_jax{os.sep}" in frame.filename, f"raised outside gradcam_jax: {frame}"
    message = str(error)
    named = [n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w(])", message)]
    assert named, f"the message names none of {names}: {message}"


def call_or_error(fn):
    try:
        return fn(), None
    except Exception as e:  # the invariant decides which exceptions are acceptable
        return None, e


def check_nan_pattern(out, bad, name):
    """Each example (example-target) all NaN where ``bad``, all finite elsewhere."""
    flat = np.asarray(out, np.float32).reshape(bad.shape + (-1,))
    for idx in np.ndindex(*bad.shape):
        if bad[idx]:
            assert np.isnan(flat[idx]).all(), f"{name}: example {idx} has a NaN score but not a NaN map"
        else:
            assert np.isfinite(flat[idx]).all(), f"{name}: example {idx} has a finite score but {flat[idx]}"


# ------------------------------------------------------------------ the explainers

CAM_METHODS = ["grad_cam", "grad_cam_plus_plus", "layer_cam", "eigen_cam"]
MAP_EXPLAINERS = CAM_METHODS + ["score_cam", "ablation_cam", "occlusion"]
PIXEL_EXPLAINERS = ["gradients", "guided_backprop", "guided_grad_cam", "smooth_grad"]
KEY = jax.random.key(0)


def explain(name, case, layout):
    tap, fn, x, t = TAPS[case["key"]], MODELS[case["key"]], case["x"], case["target"]
    if name in CAM_METHODS:
        return gcj.cam(tap, x, t, name, layout=layout)
    if name == "score_cam":
        return gcj.score_cam(tap, x, t, layout=layout, chunk_size=8)
    if name == "ablation_cam":
        return gcj.ablation_cam(tap, x, t, layout=layout)
    if name == "occlusion":
        return gcj.occlusion(fn, x, t, window=2, stride=2, layout=layout)
    if name == "guided_grad_cam":
        return gcj.guided_grad_cam(tap, x, t, layout=layout)
    if name == "smooth_grad":
        return gcj.smooth_grad(fn, x, t, key=KEY, n_samples=2)
    return {"gradients": gcj.gradients, "guided_backprop": gcj.guided_backprop}[name](fn, x, t)


def check_explanation(name, case, out, cls, multi):
    x, (batch, k) = case["x"], cls.shape
    z, a, scores = np_forward(case["x_nhwc"], case["key"][1])
    lead = (batch, k) if multi else (batch,)
    if name in MAP_EXPLAINERS:
        assert out.shape == lead + case["size"] and out.dtype == jnp.float32, (name, out.shape)
    else:
        assert out.shape == lead + x.shape[1:], (name, out.shape, x.shape)
    bad = (
        np.isnan(np.take_along_axis(scores, cls, axis=-1))
        | np.isnan(case["x_nhwc"]).any(axis=(1, 2, 3))[:, None]
    )
    bad = bad if multi else bad[:, 0]
    check_nan_pattern(out, bad, name)
    cls_b = cls if multi else cls[:, :1]
    got = np.asarray(out, np.float64).reshape((batch, k if multi else 1) + out.shape[len(lead) :])
    ok = ~(bad if multi else bad[:, None])
    if name == "grad_cam":
        want, span = np_grad_cam(a, cls_b, case["size"])
        ok &= span > 1e-4 * np.abs(want).max(initial=1.0)
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-4, atol=1e-4)
    elif name == "gradients":
        h, w = case["size"]
        want = np_gradients(z, cls_b, h * w)
        if case["key"][0]:
            want = np.moveaxis(want, -1, 2)
        tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[case["dtype"]]
        np.testing.assert_allclose(got[ok], want[ok], rtol=tol, atol=tol * np.abs(want).max(initial=1.0))


@FUZZ
@given(name=st.sampled_from(MAP_EXPLAINERS + PIXEL_EXPLAINERS), case=cases(), explicit=st.booleans())
def test_every_explainer_gives_the_right_answer_or_a_clear_refusal(name, case, explicit):
    channels_first = case["key"][0]
    layout = "NCHW" if channels_first else ("NHWC" if explicit else None)
    out, error = call_or_error(lambda: explain(name, case, layout))
    _, _, scores = np_forward(case["x_nhwc"], case["key"][1])
    expect = expected_classes(case["target"], case["x"].shape[0], scores)
    if case["dtype"] in ("uint8", "int32"):
        expect = (expect if isinstance(expect, set) else set()) | {TypeError}
    event(f"{name}: {'refused' if isinstance(expect, set) else 'computed'}")
    if isinstance(expect, set):
        assert error is not None, f"{name} accepted what it should refuse ({expect}): {case['target']!r}"
        check_refusal(error, ["x", "target", "layout"])
        assert isinstance(error, tuple(expect)), f"{type(error).__name__}, expected {expect}: {error}"
        return
    if error is not None:
        raise AssertionError(f"{name} refused a valid call: {type(error).__name__}: {error}") from error
    check_explanation(name, case, out, *expect)


# ------------------------------------------------------------------ metrics

METRICS = ["deletion", "confidence_change", "pointing_game", "spearman"]


@st.composite
def metric_cases(draw):
    case = draw(cases())
    batch = case["x"].shape[0]
    r = np.random.default_rng(draw(st.integers(0, 3)))
    maps = r.random((batch, *case["size"])).astype(np.float32)
    if batch and draw(st.booleans()):
        maps[-1, 0, 0] = np.nan
    case["maps"] = maps
    case["other"] = r.random(maps.shape).astype(np.float32)
    case["masks"] = r.random(maps.shape) > 0.5
    return case


def np_pointing(maps, masks):
    flat = maps.reshape(len(maps), -1)
    peak = np.argmax(flat, axis=-1)
    return masks.reshape(len(maps), -1)[np.arange(len(maps)), peak] & ~np.isnan(flat).any(-1)


def softmax(s):
    e = np.exp(s - np.max(s, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def run_metric(name, case, layout):
    fn, x, t, maps = MODELS[case["key"]], case["x"], case["target"], case["maps"]
    if name == "deletion":
        return metrics.deletion(fn, x, maps, t, n_steps=2, layout=layout).auc
    if name == "confidence_change":
        return metrics.confidence_change(fn, x, maps, t, layout=layout)
    if name == "pointing_game":
        return metrics.pointing_game(maps, case["masks"])
    return metrics.spearman(maps, case["other"])


def check_metric(name, case, out, cls):
    maps, batch = case["maps"], case["maps"].shape[0]
    _, _, scores = np_forward(case["x_nhwc"], case["key"][1])
    map_nan = np.isnan(maps.reshape(batch, -1)).any(-1)
    if name == "pointing_game":
        np.testing.assert_array_equal(np.asarray(out), np_pointing(maps, case["masks"]))
        return
    if name == "spearman":
        want = [stats.spearmanr(m.ravel(), o.ravel())[0] for m, o in zip(maps, case["other"], strict=True)]
        check_nan_pattern(out, map_nan, name)
        np.testing.assert_allclose(np.asarray(out)[~map_nan], np.asarray(want)[~map_nan], atol=1e-5)
        return
    clean = softmax(scores)[np.arange(batch), cls[:, 0]]
    bad = np.isnan(clean) | map_nan
    values = out.drop if name == "confidence_change" else out
    assert values.shape == (batch,)
    check_nan_pattern(values, bad, name)
    if name == "confidence_change":
        check_nan_pattern(out.clean, np.isnan(clean), name)
        np.testing.assert_allclose(np.asarray(out.clean)[~bad], clean[~bad], rtol=1e-4, atol=1e-6)
        assert not np.asarray(out.increase)[bad].any()


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))
@given(name=st.sampled_from(METRICS), case=metric_cases())
def test_metrics_give_the_right_answer_or_a_clear_refusal(name, case):
    layout = "NCHW" if case["key"][0] else None
    out, error = call_or_error(lambda: run_metric(name, case, layout))
    batch = case["x"].shape[0]
    if name in ("pointing_game", "spearman"):
        expect = {ValueError} if batch == 0 else (None, False)
        names = ["maps", "a", "b"]
    else:
        _, _, scores = np_forward(case["x_nhwc"], case["key"][1])
        expect = expected_classes(case["target"], batch, scores, metric=True)
        if case["dtype"] in ("uint8", "int32"):
            expect = (expect if isinstance(expect, set) else set()) | {TypeError}
        names = ["images", "maps", "target", "layout"]
    event(f"{name}: {'refused' if isinstance(expect, set) else 'computed'}")
    if isinstance(expect, set):
        assert error is not None, f"{name} accepted what it should refuse ({expect}): {case['target']!r}"
        check_refusal(error, names)
        assert isinstance(error, tuple(expect)), f"{type(error).__name__}, expected {expect}: {error}"
        return
    if error is not None:
        raise AssertionError(f"{name} refused a valid call: {type(error).__name__}: {error}") from error
    check_metric(name, case, out, expect[0])


def test_the_fuzz_reference_is_independent_and_right():
    """The NumPy twin agrees with the JAX net, so the fuzz tests compare against something true."""
    x = np.random.default_rng(5).normal(size=(2, 4, 6, 3)).astype(np.float32)
    for (cf, nan), model in MODELS.items():
        xin = np.moveaxis(x, -1, 1) if cf else x
        got = np.asarray(model(xin))
        want = np_forward(x, nan)[2]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    maps = gcj.grad_cam(TAPS[False, False], x, [1, 3])
    z, a, _ = np_forward(x, False)
    want, _ = np_grad_cam(a, np.array([[1, 3], [1, 3]]), (4, 6))
    np.testing.assert_allclose(np.asarray(maps), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        gcj.grad_cam(TAPS[False, False], x, 2**32 + 1)
