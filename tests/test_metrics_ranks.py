"""gradcam_jax.metrics on signals (B, T, C) and volumes (B, D, H, W, C), channels-first and pytree
inputs, against NumPy / SciPy written out here; the 2-D-only metrics refuse other ranks.

The model is a pooled linear one that NumPy evaluates too: average pooling by 2 along every
spatial axis, then ``flatten @ W + bias``. Every expected value is computed independently of
the code under test (a NumPy loop over saliency order, SciPy's ``gaussian_filter``,
``distance_transform_edt`` and ``spearmanr``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import JIT_OR_NOT
from scipy import ndimage, stats

from gradcam_jax import metrics

SIGNAL = ((12,), 2, "NCL")
VOLUME = ((4, 4, 6), 3, "NCDHW")
RANKS = pytest.mark.parametrize("spatial,c,first", [SIGNAL, VOLUME], ids=["signal", "volume"])


def pooled_model(spatial, c, classes=4, seed=0, pool=2):
    """scores = flatten(avgpool_pool(x)) @ W + bias for x (B, *spatial, C); and its NumPy twin."""
    r = np.random.default_rng(seed)
    n = int(np.prod([s // pool for s in spatial])) * c
    wt = (r.normal(size=(n, classes)) / np.sqrt(n) * 6).astype(np.float32)
    bias = r.normal(size=(classes,)).astype(np.float32)

    def pooled(z):
        shape = [z.shape[0]]
        for s in spatial:
            shape += [s // pool, pool]
        z = z.reshape(shape + [c])
        return z.mean(axis=tuple(2 + 2 * i for i in range(len(spatial))))

    def fn(x):
        return pooled(x).reshape(x.shape[0], -1) @ jnp.asarray(wt) + jnp.asarray(bias)

    def np_fn(x):
        return pooled(np.asarray(x, np.float64)).reshape(len(x), -1) @ wt.astype(np.float64) + bias

    return fn, np_fn


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def loop_curve(np_fn, x, maps, target, n_steps, start, fill):
    """Step k: ``fill`` at the floor(k N / n) most salient positions (all channels), ``start``
    elsewhere; the target's probability; its trapezoidal area over the fraction changed."""
    b, c = x.shape[0], x.shape[-1]
    n = maps[0].size
    scores = np.zeros((b, n_steps + 1))
    fractions = np.arange(n_steps + 1) * n // n_steps / n
    for i in range(b):
        order = np.argsort(-maps[i].ravel(), kind="stable")
        for k in range(n_steps + 1):
            cut = k * n // n_steps
            xi = start[i].reshape(n, c).copy()
            xi[order[:cut]] = fill[i].reshape(n, c)[order[:cut]]
            scores[i, k] = softmax(np_fn(xi.reshape((1,) + x.shape[1:])))[0, target[i]]
    auc = ((scores[:, 1:] + scores[:, :-1]) / 2 * np.diff(fractions)).sum(axis=1)
    return auc, scores, fractions


def problem(rng, spatial, c, b=3):
    x = rng.normal(size=(b, *spatial, c)).astype(np.float32)
    maps = np.round(rng.random((b, *spatial)) * 5).astype(np.float32)  # many ties
    return x, maps


def scipy_blur(x, sigma):
    return np.stack(
        [
            ndimage.gaussian_filter(im.astype(np.float64), (sigma,) * (im.ndim - 1) + (0,), truncate=4.0)
            for im in x
        ]
    )


# --------------------------------------------------------------------------------------------
# Deletion, insertion, confidence change against NumPy loops
# --------------------------------------------------------------------------------------------


@JIT_OR_NOT
@RANKS
def test_deletion_matches_a_numpy_loop(rng, wrap, spatial, c, first):
    fn, np_fn = pooled_model(spatial, c)
    x, maps = problem(rng, spatial, c)
    target = np.array([0, 3, 1])
    run = wrap(lambda x, m, t: metrics.deletion(fn, x, m, t, n_steps=7, baseline=0.25, chunk_size=4))
    got = run(x, maps, target)
    auc, curve, fr = loop_curve(np_fn, x, maps, target, 7, x, np.full_like(x, 0.25))
    np.testing.assert_allclose(np.asarray(got.scores), curve, atol=3e-5)
    np.testing.assert_allclose(np.asarray(got.auc), auc, atol=3e-5)
    np.testing.assert_allclose(np.asarray(got.fractions), fr, atol=1e-7)


@RANKS
def test_insertion_blurs_every_spatial_axis_and_matches_a_numpy_loop(rng, spatial, c, first):
    fn, np_fn = pooled_model(spatial, c, seed=1)
    x, maps = problem(rng, spatial, c)
    target = np.argmax(np_fn(x), axis=-1)
    auc, curve, _ = loop_curve(np_fn, x, maps, target, 6, scipy_blur(x, 1.5), x)
    for chunk in (5, 64):
        got = metrics.insertion(fn, x, maps, None, n_steps=6, blur_sigma=1.5, chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(got.scores), curve, atol=3e-5)
        np.testing.assert_allclose(np.asarray(got.auc), auc, atol=3e-5)
    got = metrics.insertion(fn, x, maps, target, n_steps=3, canvas=0.0)
    _, curve0, _ = loop_curve(np_fn, x, maps, target, 3, np.zeros_like(x), x)
    np.testing.assert_allclose(np.asarray(got.scores), curve0, atol=3e-5)


@RANKS
def test_confidence_change_matches_the_formula(rng, spatial, c, first):
    fn, np_fn = pooled_model(spatial, c, seed=2)
    x = rng.normal(size=(4, *spatial, c)).astype(np.float32)
    maps = rng.random((4, *spatial)).astype(np.float32)
    maps[0] = 1.0  # the unchanged input: no drop
    target = np.array([0, 1, 2, 3])
    got = metrics.confidence_change(fn, x, maps, target, chunk_size=3)
    y = softmax(np_fn(x))[np.arange(4), target]
    o = softmax(np_fn(x * maps[..., None]))[np.arange(4), target]
    np.testing.assert_allclose(np.asarray(got.clean), y, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.masked), o, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.drop), np.maximum(y - o, 0) / y * 100, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(got.increase)[1:], (o > y)[1:])
    # a per-channel baseline (C,): masked = baseline + L (x - baseline)
    base = rng.normal(size=(c,)).astype(np.float32)
    got = metrics.confidence_change(fn, x, maps, target, baseline=base, softmax=False)
    want = np_fn(base + maps[..., None] * (x - base))[np.arange(4), target]
    np.testing.assert_allclose(np.asarray(got.masked), want, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Layouts and pytree inputs give the channels-last numbers
# --------------------------------------------------------------------------------------------


@RANKS
def test_channels_first_with_layout_gives_the_channels_last_numbers(rng, spatial, c, first):
    fn, _ = pooled_model(spatial, c, seed=3)
    fn_first = lambda z: fn(jnp.moveaxis(z, 1, -1))
    x, maps = problem(rng, spatial, c)
    xf = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    target = np.array([2, 0, 1])
    base = rng.normal(size=(c,)).astype(np.float32)  # per channel, in each layout's own shape
    base_first = base.reshape((c,) + (1,) * len(spatial))
    pairs = [
        (
            metrics.deletion(fn, x, maps, target, n_steps=5, baseline=base),
            metrics.deletion(fn_first, xf, maps, target, n_steps=5, baseline=base_first, layout=first),
        ),
        (
            metrics.insertion(fn, x, maps, None, n_steps=5, blur_sigma=1.0),
            metrics.insertion(fn_first, xf, maps, None, n_steps=5, blur_sigma=1.0, layout=first),
        ),
        (
            metrics.confidence_change(fn, x, maps / 5, target),
            metrics.confidence_change(fn_first, xf, maps / 5, target, layout=first),
        ),
    ]
    for last, chans_first in pairs:
        for a, b in zip(last, chans_first, strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def test_images_channels_first_with_layout_give_the_channels_last_numbers(rng):
    fn, _ = pooled_model((8, 8), 3, seed=6)
    fn_first = lambda z: fn(jnp.moveaxis(z, 1, -1))
    x, maps = problem(rng, (8, 8), 3, b=2)
    xf = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    target = np.array([1, 2])
    kw = {"fractions": (0.25, 0.5), "noise": 0.0, "tol": 1e-6, "max_iter": 2000}
    pairs = [
        (
            metrics.deletion(fn, x, maps, target, n_steps=4),
            metrics.deletion(fn_first, xf, maps, target, n_steps=4, layout="NCHW"),
        ),
        (
            metrics.insertion(fn, x, maps, target, n_steps=4, blur_sigma=1.0),
            metrics.insertion(fn_first, xf, maps, target, n_steps=4, blur_sigma=1.0, layout="NCHW"),
        ),
        (
            metrics.road(fn, x, maps, target, **kw),
            metrics.road(fn_first, xf, maps, target, layout="NCHW", **kw),
        ),
    ]
    for last, chans_first in pairs:
        for a, b in zip(last, chans_first, strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_a_channels_first_volume_without_layout_is_refused(rng):
    fn, _ = pooled_model((4, 4, 6), 3)
    x = np.zeros((2, 3, 4, 4, 6), np.float32)  # looks channels-first
    with pytest.raises(ValueError, match="layout="):
        metrics.deletion(fn, x, np.zeros((2, 4, 4, 6), np.float32))


def test_pytree_inputs_pick_the_image_with_input(rng):
    spatial, c = (12,), 2
    fn, np_fn = pooled_model(spatial, c, seed=4)
    x, maps = problem(rng, spatial, c)
    gain = np.array([1.0, 2.0, 0.5], np.float32)
    target = np.array([1, 1, 3])
    xf = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    scale = lambda s, g: s * g[:, None]
    tree_fn = lambda d: scale(fn(jnp.moveaxis(d["signal"], 1, -1)), d["gain"])
    np_tree = lambda z, g: scale(np_fn(z), g)

    def deleted(i):  # example i alone, with its own gain
        s = slice(i, i + 1)
        return loop_curve(lambda z: np_tree(z, gain[s]), x[s], maps[s], target[s], 4, x[s], 0 * x[s])[1][0]

    want = np.stack([deleted(i) for i in range(3)])
    tree = {"signal": xf, "gain": gain}
    for kwargs in ({"input": "signal"}, {}):  # the only floating leaf of rank >= 3 by default
        got = metrics.deletion(tree_fn, tree, maps, target, n_steps=4, layout="NCL", **kwargs)
        np.testing.assert_allclose(np.asarray(got.scores), want, atol=3e-5)
    pair_fn = lambda t: scale(fn(t[1]), t[0])
    got = metrics.confidence_change(pair_fn, (gain, x), maps / 5, target, input=1)
    o = softmax(np_tree(x * maps[..., None] / 5, gain))[np.arange(3), target]
    np.testing.assert_allclose(np.asarray(got.masked), o, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Saliency order, pixel saliency, blur
# --------------------------------------------------------------------------------------------


@RANKS
def test_saliency_order_and_ranks_over_flattened_positions(rng, spatial, c, first):
    _, maps = problem(rng, spatial, c)
    order = np.asarray(metrics.saliency_order(maps))
    ranks = np.asarray(metrics.saliency_ranks(maps))
    assert ranks.shape == maps.shape
    for m, o, r in zip(maps, order, ranks, strict=True):
        want = np.argsort(-m.ravel(), kind="stable")
        np.testing.assert_array_equal(o, want)
        np.testing.assert_array_equal(r.ravel()[want], np.arange(m.size))


@RANKS
def test_pixel_saliency_collapses_the_layouts_channel_axis(rng, spatial, c, first):
    a = rng.normal(size=(2, *spatial, c)).astype(np.float32)
    last = "NLC" if len(spatial) == 1 else "NDHWC"
    np.testing.assert_allclose(
        np.asarray(metrics.pixel_saliency(a, layout=last)), np.abs(a).sum(-1), rtol=1e-6
    )
    af = np.moveaxis(a, -1, 1)
    np.testing.assert_allclose(
        np.asarray(metrics.pixel_saliency(af, "l2", layout=first)), np.linalg.norm(a, axis=-1), rtol=1e-5
    )
    maps = np.abs(a).max(-1)
    np.testing.assert_array_equal(np.asarray(metrics.pixel_saliency(maps, layout=first)), maps)  # a map
    if len(spatial) == 3:  # (B, D, H, W, C) is unambiguous without layout
        np.testing.assert_allclose(np.asarray(metrics.pixel_saliency(a, "abs_max")), maps, rtol=1e-6)
    with pytest.raises(ValueError, match="layout="):
        metrics.pixel_saliency(a[..., None], layout=first)


@pytest.mark.parametrize("shape,sigma", [((2, 20, 2), 2.0), ((2, 12, 3), 5.0), ((2, 6, 7, 8, 2), 1.5)])
def test_gaussian_blur_of_any_rank_matches_scipy(rng, shape, sigma):
    x = rng.normal(size=shape).astype(np.float32)
    want = scipy_blur(x, sigma)
    np.testing.assert_allclose(np.asarray(metrics.gaussian_blur(x, sigma)), want, atol=2e-5)
    first = {3: "NCL", 5: "NCDHW"}[len(shape)]
    got = metrics.gaussian_blur(np.moveaxis(x, -1, 1), sigma, layout=first)
    np.testing.assert_allclose(np.moveaxis(np.asarray(got), 1, -1), want, atol=2e-5)


# --------------------------------------------------------------------------------------------
# Pointing game, correlations, sanity checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(40,), (5, 6, 7)], ids=["signal", "volume"])
def test_pointing_game_is_the_argmax_inside_the_mask(rng, spatial):
    b = 30
    maps = rng.random((b, *spatial)).astype(np.float32)
    masks = np.zeros((b, *spatial), bool)
    for i in range(b):
        lo = [rng.integers(0, s - 1) for s in spatial]
        masks[(i, *(slice(v, v + rng.integers(1, 4)) for v in lo))] = True
    got = np.asarray(metrics.pointing_game(maps, masks))
    want = [k.ravel()[np.argmax(m)] for m, k in zip(maps, masks, strict=True)]  # by hand
    np.testing.assert_array_equal(got, want)
    assert 0 < np.mean(want) < 1
    for tolerance in (1.0, 2.5):
        got = np.asarray(metrics.pointing_game(maps, masks, tolerance))
        want = [
            ndimage.distance_transform_edt(~k)[np.unravel_index(np.argmax(m), m.shape)] <= tolerance
            for m, k in zip(maps, masks, strict=True)
        ]
        np.testing.assert_array_equal(got, want)
    const = np.ones((1, *spatial), np.float32)  # ties: the first position
    first = np.zeros((1, *spatial), bool)
    first.reshape(-1)[0] = True
    assert bool(metrics.pointing_game(const, first)[0])


@pytest.mark.parametrize("spatial", [(50,), (4, 5, 6)], ids=["signal", "volume"])
def test_correlations_and_faithfulness_on_any_rank(rng, spatial):
    a = np.round(rng.normal(size=(3, *spatial)) * 2).astype(np.float32)
    b = (a + rng.normal(size=a.shape) * 2).astype(np.float32)
    pairs = list(zip(a, b, strict=True))
    rho = [stats.spearmanr(x.ravel(), y.ravel()).statistic for x, y in pairs]
    np.testing.assert_allclose(np.asarray(metrics.spearman(a, b)), rho, atol=2e-5)
    np.testing.assert_allclose(np.asarray(metrics.faithfulness(a, b)), rho, atol=2e-5)
    r = [stats.pearsonr(x.ravel(), y.ravel()).statistic for x, y in pairs]
    np.testing.assert_allclose(np.asarray(metrics.pearson(a, b)), r, atol=2e-5)
    with pytest.raises(ValueError, match="shape"):
        metrics.faithfulness(a, b[..., :-1])


def test_sanity_check_on_signals_uses_the_correlations_only(rng):
    x = rng.normal(size=(3, 16, 2)).astype(np.float32)

    def weights(seed):
        r = np.random.default_rng(seed)
        return {"params": {"body": {"w": r.normal(size=(2, 2))}, "head": {"w": r.normal(size=(2,))}}}

    def explain(v, x):  # per-channel attributions (B, T, C) in the input's layout
        return (x @ jnp.asarray(v["params"]["body"]["w"], jnp.float32)) * v["params"]["head"]["w"]

    variables, random_variables = weights(0), weights(1)
    res = metrics.sanity_check(
        explain, variables, ["head", "body"], x, random_variables=random_variables, keep_maps=True
    )
    assert set(res.similarity) == {"spearman", "spearman_abs"} and res.maps.shape == (3, 3, 16)
    base = np.abs(np.asarray(explain(variables, x))).sum(-1)
    last = np.abs(np.asarray(explain(random_variables, x))).sum(-1)
    np.testing.assert_allclose(np.asarray(res.maps[-1]), last, rtol=1e-5)
    want = [stats.spearmanr(p.ravel(), q.ravel()).statistic for p, q in zip(base, last, strict=True)]
    np.testing.assert_allclose(res.similarity["spearman"][-1], want, atol=1e-5)
    # channels-first attributions with layout=
    first = metrics.sanity_check(
        lambda v, z: jnp.moveaxis(explain(v, jnp.moveaxis(z, 1, -1)), -1, 1),
        variables,
        ["head", "body"],
        np.moveaxis(x, -1, 1),
        random_variables=random_variables,
        layout="NCL",
    )
    np.testing.assert_allclose(first.similarity["spearman"], res.similarity["spearman"], atol=1e-6)
    with pytest.raises(ValueError, match="2-D"):
        metrics.sanity_check(
            explain, variables, ["head"], x, random_variables=random_variables, similarities=["ssim"]
        )


# --------------------------------------------------------------------------------------------
# What stays 2-D says so; evaluate on a signal
# --------------------------------------------------------------------------------------------


def test_two_d_only_metrics_refuse_signals_and_volumes(rng):
    fn, _ = pooled_model((12,), 2)
    x = rng.normal(size=(2, 12, 2)).astype(np.float32)
    maps = rng.random((2, 12)).astype(np.float32)
    with pytest.raises(ValueError, match="SSIM is a 2-D image measure.*signal"):
        metrics.ssim(maps, maps)
    with pytest.raises(ValueError, match="volume"):
        metrics.ssim(np.zeros((2, 12, 12, 12), np.float32), np.zeros((2, 12, 12, 12), np.float32))
    with pytest.raises(ValueError, match="boxes are 2-D"):
        metrics.localization_box(maps)
    with pytest.raises(ValueError, match="boxes are 2-D"):
        metrics.box_iou(np.array([[1, 4]]), np.array([[2, 5]]))
    with pytest.raises(ValueError, match="boxes are 2-D"):
        metrics.boxes_to_masks(np.array([[1, 2, 3, 4]]), (12,))
    with pytest.raises(ValueError, match="2-D"):
        metrics.connected_components(np.ones((12,), bool))
    with pytest.raises(ValueError, match="boxes are for 2-D maps only"):
        metrics.pointing_game(maps, np.array([[0, 0, 3, 3], [1, 1, 2, 2]]))
    with pytest.raises(ValueError, match="ROAD.*2-D.*signal"):
        metrics.road(fn, x, maps, key=jax.random.key(0))
    with pytest.raises(ValueError, match="2-D"):
        metrics.noisy_linear_imputation(x, maps > 0.5, noise=0.0)
    with pytest.raises(ValueError, match="boxes.*2-D"):
        metrics.evaluate(fn, x, maps, boxes=np.array([[0, 0, 3, 3], [1, 1, 2, 2]]))


def test_signal_maps_are_checked_against_the_input(rng):
    fn, _ = pooled_model((12,), 2)
    x = rng.normal(size=(2, 12, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=r"do not match the images' \(B, T\)"):
        metrics.deletion(fn, x, np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match="pixel_saliency"):
        metrics.insertion(fn, x, np.zeros((2, 12, 2), np.float32))
    with pytest.raises(ValueError, match="spatial axes"):
        metrics.confidence_change(fn, np.zeros((2, 12), np.float32), np.zeros((2, 12), np.float32))


def test_evaluate_on_a_signal(rng):
    fn, _ = pooled_model((12,), 2, seed=5)
    x = rng.normal(size=(3, 12, 2)).astype(np.float32)
    maps = rng.random((3, 12)).astype(np.float32)
    masks = np.zeros((3, 12), bool)
    masks[:, 3:6] = True
    occ = rng.normal(size=(3, 12)).astype(np.float32)
    target = np.array([0, 1, 2])
    out = metrics.evaluate(fn, x, maps, target, masks=masks, occlusion_maps=occ, n_steps=4, blur_sigma=1.0)
    assert set(out) == {
        "deletion",
        "insertion",
        "avg_drop",
        "increase",
        "pointing",
        "pointing_15",
        "faithfulness",
    }
    np.testing.assert_allclose(
        np.asarray(out["deletion"]),
        np.asarray(metrics.deletion(fn, x, maps, target, n_steps=4).auc),
        atol=1e-7,
    )
    np.testing.assert_array_equal(np.asarray(out["pointing"]), masks[np.arange(3), np.argmax(maps, -1)])
