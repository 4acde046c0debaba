"""One input gate and no NaN laundering (issue 19): a regression test per library finding.

Each test names the finding it pins down (2, 3, 4, 5, 6, 10, 11, 12's ``viz.overlay`` part,
13). The model is the small ReLU conv net of ``nets.py`` at 8 x 8 (one input shape, so the
kernels compile once for the module); ``nan_tap`` is the same net with class 0's score NaN.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest

import gradcam_jax as gcj
from gradcam_jax import metrics, viz

W = nets.weights(0)
FEATURES, HEAD = nets.split_functions(W)
TAP = gcj.split_tap(FEATURES, HEAD)
NAN_CLASS0 = jnp.asarray([np.nan, 0, 0, 0, 0], jnp.float32)
NAN_TAP = gcj.split_tap(FEATURES, lambda a: HEAD(a) + NAN_CLASS0)
X = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)


def model(x):
    return HEAD(FEATURES(x))


def nan_model(x):
    return HEAD(FEATURES(x)) + NAN_CLASS0


def flax_like_model(x):
    """Leading axes beyond (H, W, C) are batch axes, as for a Flax Conv: (B, 1, H, W, C) -> (B, 1, 5)."""
    return model(x.reshape((-1,) + x.shape[-3:])).reshape(x.shape[:-3] + (5,))


# Every explainer as (name, call(tap_or_fn_kind, x, target)): CAM methods take the tap, the
# pixel-space ones the model function.
EXPLAINERS = {
    "grad_cam": lambda nan, x, t: gcj.grad_cam(NAN_TAP if nan else TAP, x, t),
    "grad_cam_plus_plus": lambda nan, x, t: gcj.cam(NAN_TAP if nan else TAP, x, t, "grad_cam_plus_plus"),
    "eigen_cam": lambda nan, x, t: gcj.cam(NAN_TAP if nan else TAP, x, t, "eigen_cam"),
    "score_cam": lambda nan, x, t: gcj.score_cam(NAN_TAP if nan else TAP, x, t),
    "ablation_cam": lambda nan, x, t: gcj.ablation_cam(NAN_TAP if nan else TAP, x, t),
    "guided_grad_cam": lambda nan, x, t: gcj.guided_grad_cam(NAN_TAP if nan else TAP, x, t),
    "gradients": lambda nan, x, t: gcj.gradients(nan_model if nan else model, x, t),
    "guided_backprop": lambda nan, x, t: gcj.guided_backprop(nan_model if nan else model, x, t),
    "occlusion": lambda nan, x, t: gcj.occlusion(nan_model if nan else model, x, t, window=4, stride=4),
}
ALL = pytest.mark.parametrize("name", sorted(EXPLAINERS))
# Eigen-CAM reads neither the target nor the scores: the target and score checks are not its.
TARGETED = pytest.mark.parametrize("name", sorted(set(EXPLAINERS) - {"eigen_cam"}))


def explain(name, x, target, nan=False):
    return EXPLAINERS[name](nan, x, target)


# ------------------------------------------------------------------ finding 2: integer images


@ALL
def test_integer_images_are_refused_with_one_message(name):
    """uint8 pixels: the same TypeError everywhere (CAM methods ran the model on them before)."""
    xu = (np.abs(X) * 60).astype(np.uint8)
    with pytest.raises(TypeError, match=r"x has dtype uint8.*x\.astype\(jnp\.float32\).*preprocess"):
        explain(name, xu, 0)


def test_integer_images_are_refused_by_smooth_grad_and_the_metrics():
    xu = (np.abs(X) * 60).astype(np.uint8)
    with pytest.raises(TypeError, match=r"x has dtype uint8.*x\.astype\(jnp\.float32\)"):
        gcj.smooth_grad(model, xu, key=jax.random.key(0), n_samples=2)
    maps = np.ones((2, 8, 8), np.float32)
    for metric in (metrics.deletion, metrics.confidence_change):
        with pytest.raises(TypeError, match=r"images has dtype uint8.*images\.astype\(jnp\.float32\)"):
            metric(model, xu, maps, 0)


# ------------------------------------------------------------------ finding 3: targets beyond int32


@pytest.mark.parametrize(
    "target",
    [2**32 + 3, np.array([2**40, 1]), np.int64(2**32 + 1), [2**33], 2**70, np.array([-(2**32), 1])],
    ids=["2**32+3", "array 2**40", "int64 2**32+1", "list 2**33", "2**70", "array -2**32"],
)
@pytest.mark.parametrize("name", ["grad_cam", "score_cam", "gradients", "occlusion"])
def test_targets_are_range_checked_before_any_cast(name, target):
    """2**32 + 3 wrapped to class 3 (and 2**40 to class 0) before the range check saw it."""
    with pytest.raises(ValueError, match="out of range: the model has 5 classes"):
        explain(name, X, target)


def test_metric_targets_are_range_checked_before_any_cast():
    with pytest.raises(ValueError, match="out of range: the model has 5 classes"):
        metrics.deletion(model, X, np.ones((2, 8, 8), np.float32), np.array([2**32, 0]), n_steps=2)


# ------------------------------------------------------------------ finding 4: callable targets


@TARGETED
def test_callable_targets_must_keep_the_batch_axis(name):
    """A (1,) result for a batch of 2 gave outputs (or a zero gradient for image 1) in most methods."""
    with pytest.raises(ValueError, match=r"target must keep the batch axis: x has 2 examples.*\(1,\)"):
        explain(name, X, lambda s: s[:1, 0])


@TARGETED
def test_callable_targets_must_return_floating_scores(name):
    """An argmax (int) result gave all-zero maps."""
    with pytest.raises(TypeError, match="callable target must return floating scores.*int32"):
        explain(name, X, lambda s: jnp.argmax(s, axis=-1))


def test_callable_targets_of_any_rank_but_1_or_2_are_refused():
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, K\).*\(2, 5, 1\)"):
        gcj.score_cam(TAP, X, lambda s: s[..., None])


# ------------------------------------------------------------------ finding 5: NaN scores


@TARGETED
def test_a_nan_score_gives_a_nan_map_in_every_method(name):
    """Example 0 explains class 0, whose score is NaN; example 1 class 1 (finite)."""
    out = np.asarray(explain(name, X, np.array([0, 1]), nan=True))
    assert out.dtype == np.float32
    assert np.isnan(out[0]).all(), f"{name}: a NaN score's map must be all NaN"
    assert np.isfinite(out[1]).all()
    if name in ("grad_cam", "score_cam", "ablation_cam", "grad_cam_plus_plus"):
        ref = np.asarray(explain(name, X, np.array([1, 1])))[1]
        np.testing.assert_allclose(out[1], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_nan_scores_give_nan_maps_normalised_or_not(normalize):
    maps = gcj.grad_cam(NAN_TAP, X, [0, 1], normalize=normalize)  # (B, K=2, H, W)
    assert np.isnan(np.asarray(maps[:, 0])).all() and np.isfinite(np.asarray(maps[:, 1])).all()


def test_normalize_maps_never_turns_nan_into_zeros():
    m = jnp.stack([jnp.zeros((3, 3)), jnp.full((3, 3), jnp.nan), jnp.eye(3).at[0, 0].set(jnp.inf)])
    out = np.asarray(gcj.postprocess.normalize_maps(m))
    assert (out[0] == 0).all() and np.isnan(out[1]).all() and np.isnan(out[2]).all()


def test_a_nan_input_gives_a_nan_map_and_leaves_the_others_alone():
    x = X.copy()
    x[0, 3, 3, 1] = np.nan
    maps = np.asarray(gcj.grad_cam(TAP, x, 1))
    assert np.isnan(maps[0]).all()
    np.testing.assert_allclose(maps[1], np.asarray(gcj.grad_cam(TAP, X[1:], 1))[0], rtol=1e-5, atol=1e-6)


def test_confidence_change_reports_nan_not_a_zero_drop():
    """A NaN score, or a NaN map (as explain-dir stores for unreadable files), read as a 0% drop."""
    maps = np.full((2, 8, 8), 0.5, np.float32)
    got = metrics.confidence_change(nan_model, X, maps, np.array([0, 1]), softmax=False)
    assert np.isnan(got.drop[0]) and np.isfinite(got.drop[1]) and not bool(got.increase[0])
    maps[1] = np.nan
    got = metrics.confidence_change(model, X, maps, np.array([0, 1]))
    assert np.isfinite(got.drop[0]) and np.isnan(got.drop[1]) and np.isnan(got.masked[1])
    assert not bool(got.increase[1])


def test_the_other_metrics_give_nan_for_a_nan_map():
    maps = np.array(gcj.grad_cam(TAP, X, np.array([0, 1])))
    maps[1, 2, 2] = np.nan
    t = np.array([0, 1])
    for curve in (
        metrics.deletion(model, X, maps, t, n_steps=4),
        metrics.insertion(model, X, maps, t, n_steps=4),
    ):
        assert np.isfinite(curve.auc[0]) and np.isnan(curve.auc[1]) and np.isnan(curve.scores[1]).all()
    rd = metrics.road(model, X, maps, t, noise=0.0, fractions=(0.5,))
    assert np.isnan(rd.morf[1]).all() and not np.asarray(rd.morf_correct[1]).any() and np.isfinite(rd.gap[0])
    assert np.isnan(metrics.spearman(maps, maps)[1]) and np.isnan(metrics.pearson(maps, maps)[1])
    hits = metrics.pointing_game(maps, np.ones((2, 8, 8), bool))
    assert bool(hits[0]) and not bool(hits[1])  # a NaN map points nowhere: a miss, never a hit


def test_evaluate_and_report_count_nan_examples():
    maps = np.array(gcj.grad_cam(TAP, X, np.array([0, 1])))
    maps[1] = np.nan
    out = metrics.evaluate(model, X, maps, np.array([0, 1]), masks=np.ones((2, 8, 8), bool), n_steps=2)
    for name, v in out.items():
        v = np.asarray(v)
        assert v.dtype == np.float32 and np.isfinite(v[0]) and np.isnan(v[1]), name
    report = metrics.Report()
    report.add("grad_cam", **out)
    assert report.nan_count("grad_cam") == 1 and report.nan_count("grad_cam", "deletion") == 1
    assert report.mean("grad_cam", "deletion") == pytest.approx(float(out["deletion"][0]))
    assert "NaN (a NaN map or score; left out of the means): grad_cam: 1" in report.table()


# ------------------------------------------------------------------ finding 6: targets under jit


@pytest.mark.parametrize("bad", [99, -5])
@pytest.mark.parametrize("name", ["grad_cam", "score_cam", "ablation_cam", "gradients", "occlusion"])
def test_out_of_range_traced_targets_give_nan_maps(name, bad):
    """Under an outer jit the target cannot be checked: 99 gave zeros, -5 class 0's map."""
    out = np.asarray(jax.jit(lambda t: explain(name, X, t))(jnp.array([bad, 1])))
    assert np.isnan(out[0]).all()
    np.testing.assert_allclose(
        out[1], np.asarray(explain(name, X, np.array([1, 1])))[1], rtol=1e-5, atol=1e-6
    )


def test_out_of_range_traced_targets_give_nan_metrics():
    maps = np.asarray(gcj.grad_cam(TAP, X, 1))
    got = jax.jit(lambda t: metrics.confidence_change(model, X, maps, t))(jnp.array([-5, 1]))
    assert np.isnan(got.drop[0]) and np.isnan(got.clean[0]) and np.isfinite(got.drop[1])


# ------------------------------------------------------------------ finding 10: empty batches


@ALL
def test_an_empty_batch_is_refused_by_every_explainer(name):
    with pytest.raises(ValueError, match=r"x is an empty batch \(shape \(0, 8, 8, 3\)\)"):
        explain(name, X[:0], 0)


def test_an_empty_batch_is_refused_by_every_metric():
    """Deletion, insertion, confidence change, ROAD, the pointing game and Spearman raised a bare
    ZeroDivisionError."""
    x0, m0 = X[:0], np.zeros((0, 8, 8), np.float32)
    calls = {
        "images": [
            lambda: metrics.deletion(model, x0, m0, n_steps=2),
            lambda: metrics.insertion(model, x0, m0, n_steps=2),
            lambda: metrics.confidence_change(model, x0, m0),
            lambda: metrics.road(model, x0, m0, noise=0.0),
            lambda: metrics.evaluate(model, x0, m0),
        ],
        "maps": [
            lambda: metrics.pointing_game(m0, np.zeros((0, 8, 8), bool)),
            lambda: metrics.faithfulness(m0, m0),
            lambda: metrics.localization_box(m0),
        ],
        "a": [
            lambda: metrics.spearman(m0, m0),
            lambda: metrics.pearson(m0, m0),
            lambda: metrics.ssim(m0, m0),
        ],
    }
    for arg, fns in calls.items():
        for fn in fns:
            with pytest.raises(ValueError, match=f"{arg} is an empty batch"):
                fn()


# ------------------------------------------------------------------ finding 11: wrong-rank inputs


def test_a_model_that_does_not_take_x_is_named_in_our_message():
    """A 5-D input to a 2-D Flax model: the scores come back (B, 1, 5); the message named neither x
    nor the target ("returned (1, 32, 10)")."""
    x5 = X[:, None]
    for call in (
        lambda: gcj.guided_backprop(flax_like_model, x5, 0),
        lambda: gcj.gradients(flax_like_model, x5),
        lambda: gcj.occlusion(flax_like_model, x5, 0, window=(1, 2, 2), stride=2),
        lambda: gcj.grad_cam(gcj.split_tap(lambda v: v, flax_like_model), x5),
    ):
        with pytest.raises(
            ValueError, match=r"target selects a class.*returned \(2, 1, 5\).*x has the shape"
        ):
            call()


def test_inputs_without_spatial_axes_are_refused_naming_x():
    features = np.ones((2, 5), np.float32)
    vec_tap = gcj.split_tap(lambda v: v * 1.0, lambda a: a)
    with pytest.raises(ValueError, match=r"x is features without spatial axes of shape \(2, 5\)"):
        gcj.score_cam(vec_tap, features, 0)
    with pytest.raises(
        ValueError, match=r"ablation_cam: upsample=True resizes maps to the image in x.*upsample=False"
    ):
        gcj.ablation_cam(vec_tap, features, 0)
    with pytest.raises(ValueError, match=r"images is features without spatial axes"):
        metrics.deletion(lambda v: v, features, np.ones((2, 5), np.float32))


def test_token_ids_still_reach_a_cam_method_without_upsampling():
    """The floating-dtype gate is for images, signals and volumes: int token ids (B, N) are not."""
    emb = jnp.asarray(np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32))
    v = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32))
    tap = gcj.split_tap(lambda ids: emb[ids], lambda a: jnp.tanh(a).mean(1) @ v)
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
    maps = gcj.grad_cam(tap, ids, 0, upsample=False, grid=(2, 2))
    assert maps.shape == (2, 2, 2) and np.isfinite(np.asarray(maps)).all()


# ------------------------------------------------------------------ finding 12: viz.overlay


def test_overlay_draws_nan_as_grey_hatching_with_a_warning():
    image = np.zeros((8, 8, 3), np.uint8)
    heat = np.full((8, 8), 0.0, np.float32)
    heat[:4] = np.nan
    with pytest.warns(UserWarning, match="32 NaN value.*grey hatching"):
        out = viz.overlay(image, heat, alpha=1.0)
    top, bottom = out[:4].astype(int), out[4:].astype(int)
    assert (top[..., 0] == top[..., 1]).all() and (top[..., 1] == top[..., 2]).all()  # grey
    assert len(np.unique(top[..., 0])) == 2  # hatched, not one flat colour
    zero = viz.overlay(image, np.zeros((8, 8), np.float32), alpha=1.0)
    np.testing.assert_array_equal(bottom, zero[4:])  # finite values drawn as before
    assert not (top == zero[:4]).all(axis=-1).any()  # NaN is not drawn as 0


def test_overlay_clips_infinities_with_a_warning():
    image = np.zeros((4, 4, 3), np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0], heat[0, 1] = np.inf, -np.inf
    with pytest.warns(UserWarning, match="2 infinite value.*clipped"):
        out = viz.overlay(image, heat, alpha=1.0)
    ref = heat.copy()
    ref[0, 0], ref[0, 1] = 1.0, 0.0
    np.testing.assert_array_equal(out, viz.overlay(image, ref, alpha=1.0))


# ------------------------------------------------------------------ finding 13: recompilation


def _compiles(caplog, name, calls):
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        start = len(caplog.records)
        for call in calls:
            call()
        return [r for r in caplog.records[start:] if r.getMessage().startswith(f"Compiling jit({name})")]


def test_fresh_lambdas_to_split_tap_guided_backprop_and_occlusion_compile_once(caplog):
    """Each call with a new lambda (same code, same captured values) reuses the compiled kernel."""
    x = np.random.default_rng(3).normal(size=(1, 9, 9, 3)).astype(np.float32)  # a shape of its own
    got = _compiles(caplog, "input_grads_kernel", [lambda: gcj.guided_backprop(lambda v: model(v), x, 0)] * 3)
    assert len(got) == 1, got
    got = _compiles(
        caplog, "occlusion_kernel", [lambda: gcj.occlusion(lambda v: model(v), x, 0, window=3, stride=3)] * 3
    )
    assert len(got) == 1, got
    got = _compiles(
        caplog,
        "gradient_cam_kernel",
        [lambda: gcj.grad_cam(gcj.split_tap(lambda v: FEATURES(v), lambda a: HEAD(a)), x, 0)] * 3,
    )
    assert len(got) == 1, got
    # Arrays bound with functools.partial are traced: a new array does not recompile either.
    scale = [jnp.full((5,), float(k)) for k in range(3)]
    got = _compiles(
        caplog,
        "input_grads_kernel",
        [functools.partial(gcj.gradients, lambda v, s=s: model(v) * s, x, 0) for s in scale[:1]]
        + [lambda s=s: gcj.gradients(functools.partial(lambda v, w: model(v) * w, w=s), x, 0) for s in scale],
    )
    assert len(got) == 2, got  # the closure over an array compiles once; the partial once for all


def test_an_empty_linen_layer_name_is_refused():
    """``layer=''`` tapped the whole model and failed later with an unrelated message."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x.mean(axis=(1, 2)))

    variables = Net().init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="layer is empty"):
        gcj.linen_tap(Net(), variables, "")
    with pytest.raises(ValueError, match="layer is empty"):
        gcj.linen_tap(Net(), variables, "/")
