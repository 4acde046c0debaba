"""gradcam_jax.metrics against direct NumPy / SciPy implementations on hand-made maps.

Every expected value here is computed independently of the code under test: SciPy's
``ndimage.label`` / ``distance_transform_edt`` / ``gaussian_filter``, ``scipy.stats``,
``scipy.sparse.linalg.spsolve``, scikit-image's SSIM when it is installed, or a few lines of
NumPy written out below. The synthetic-dataset tests check the metrics end to end on a task
whose answer is known by construction.
"""

import jax
import jax.numpy as jnp
import nets
import numpy as np
import pytest
from conftest import JIT_OR_NOT
from scipy import ndimage, sparse, stats
from scipy.sparse import linalg as splinalg

import gradcam_jax as gcj
from gradcam_jax import metrics

# --------------------------------------------------------------------------------------------
# NumPy references
# --------------------------------------------------------------------------------------------


def smooth_maps(rng, b, h, w, sigma=2.0):
    """Random blobby maps with several components above 15% of the max."""
    m = ndimage.gaussian_filter(rng.normal(size=(b, h, w)), sigma=(0, sigma, sigma))
    return np.maximum(m, 0).astype(np.float32)


def structure(connectivity):
    return ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)


def ref_box(m, threshold=0.15, connectivity=8):
    top = m.max()
    if top <= 0:
        return np.array([0, 0, -1, -1])
    fg = m >= threshold * top
    lab, n = ndimage.label(fg, structure(connectivity))
    sizes = np.bincount(lab.ravel())[1:]
    keep = lab == (np.argmax(sizes) + 1)
    ys, xs = np.nonzero(keep)
    return np.array([ys.min(), xs.min(), ys.max(), xs.max()])


def ref_iou(a, b):
    def area(x):
        return max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)

    ih = max(min(a[2], b[2]) - max(a[0], b[0]) + 1, 0)
    iw = max(min(a[3], b[3]) - max(a[1], b[1]) + 1, 0)
    inter = ih * iw
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def ref_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def linear_model(rng, h, w, c, classes=4):
    """A model NumPy can evaluate too: scores = flatten(x) @ W + bias."""
    wt = (rng.normal(size=(h * w * c, classes)) / np.sqrt(h * w * c) * 6).astype(np.float32)
    bias = rng.normal(size=(classes,)).astype(np.float32)

    def fn(x):
        return x.reshape(x.shape[0], -1) @ jnp.asarray(wt) + jnp.asarray(bias)

    def np_fn(x):
        return x.reshape(x.shape[0], -1).astype(np.float64) @ wt.astype(np.float64) + bias

    return fn, np_fn


def ref_curve(np_fn, images, maps, target, n_steps, start, fill):
    """Step k: ``fill`` on the floor(k HW / n) most salient pixels, ``start`` elsewhere."""
    b, h, w, c = images.shape
    hw = h * w
    out = np.zeros((b, n_steps + 1))
    fr = np.zeros(n_steps + 1)
    for i in range(b):
        order = np.argsort(-maps[i].ravel(), kind="stable")
        for k in range(n_steps + 1):
            cut = k * hw // n_steps
            x = start[i].reshape(hw, c).copy()
            x[order[:cut]] = fill[i].reshape(hw, c)[order[:cut]]
            out[i, k] = ref_softmax(np_fn(x.reshape(1, h, w, c)))[0, target[i]]
            fr[k] = cut / hw
    return np.trapezoid(out, fr, axis=1), out, fr


def ref_impute(x, removed):
    """Solve the ROAD imputation system with scipy.sparse, channel by channel."""
    h, w, c = x.shape
    idx = -np.ones((h, w), int)
    ys, xs = np.nonzero(removed)
    idx[ys, xs] = np.arange(len(ys))
    n = len(ys)
    a = sparse.lil_matrix((n, n))
    rhs = np.zeros((n, c))
    for e, (y, x0) in enumerate(zip(ys, xs, strict=False)):
        total = 0.0
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == 0 and dx == 0:
                    continue
                qy, qx = y + dy, x0 + dx
                if not (0 <= qy < h and 0 <= qx < w):
                    continue
                wt = 1 / 6 if (dy == 0 or dx == 0) else 1 / 12
                total += wt
                if removed[qy, qx]:
                    a[e, idx[qy, qx]] = -wt
                else:
                    rhs[e] += wt * x[qy, qx]
        a[e, e] = total
    sol = splinalg.spsolve(a.tocsr(), rhs)
    out = x.astype(np.float64).copy()
    out[ys, xs] = sol.reshape(n, c)
    return out


def ref_ssim(a, b, data_range=1.0):
    """Wang et al.'s SSIM with SciPy's Gaussian filter (sigma 1.5, truncate 3.5), border cropped."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    f = lambda z: ndimage.gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    s_aa = f(a * a) - mu_a**2
    s_bb = f(b * b) - mu_b**2
    s_ab = f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
    return s[5:-5, 5:-5].mean()


# --------------------------------------------------------------------------------------------
# Connected components and localisation boxes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components_match_scipy_label(rng, connectivity):
    masks = rng.random((6, 23, 31)) < 0.45
    # A long snake (one component needing many propagation steps) and an empty mask.
    snake = np.zeros((23, 31), bool)
    snake[::2, :] = True
    snake[1::4, -1] = True
    snake[3::4, 0] = True
    masks = np.concatenate([masks, snake[None], np.zeros((1, 23, 31), bool)])
    labels = np.asarray(metrics.connected_components(masks, connectivity=connectivity))
    for m, lab in zip(masks, labels, strict=False):
        ref, n = ndimage.label(m, structure(connectivity))
        assert np.all(lab[~m] == m.size)
        # Our labels are the smallest row-major index of each component; SciPy numbers the
        # components 1..n in the row-major order of their first pixel: the same order.
        uniq = np.unique(lab[m])
        assert len(uniq) == n
        renumbered = np.searchsorted(uniq, lab[m]) + 1
        np.testing.assert_array_equal(renumbered, ref[m])
        # each label is its component's first pixel
        for comp in range(1, n + 1):
            first = np.flatnonzero((ref == comp).ravel())[0]
            assert np.all(lab[ref == comp] == first)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_largest_component_matches_scipy(rng, connectivity):
    masks = rng.random((5, 20, 20)) < 0.5
    out = np.asarray(metrics.largest_component(masks, connectivity=connectivity))
    for m, got in zip(masks, out, strict=False):
        lab, n = ndimage.label(m, structure(connectivity))
        sizes = np.bincount(lab.ravel())[1:]
        np.testing.assert_array_equal(got, lab == np.argmax(sizes) + 1)


@JIT_OR_NOT
@pytest.mark.parametrize("connectivity", [4, 8])
def test_localization_box_matches_reference(rng, wrap, connectivity):
    maps = smooth_maps(rng, 8, 40, 48)
    boxes = np.asarray(wrap(lambda m: metrics.localization_box(m, 0.15, connectivity=connectivity))(maps))
    assert boxes.shape == (8, 4) and boxes.dtype == np.int32
    for m, box in zip(maps, boxes, strict=False):
        np.testing.assert_array_equal(box, ref_box(m, 0.15, connectivity))


def test_localization_box_shapes_thresholds_and_empty_maps(rng):
    maps = smooth_maps(rng, 6, 24, 24).reshape(2, 3, 24, 24)
    maps[1, 2] = 0.0  # all-zero map: no segment
    for t in (0.15, 0.5):
        boxes = np.asarray(metrics.localization_box(maps, threshold=t))
        assert boxes.shape == (2, 3, 4)
        for i in range(2):
            for k in range(3):
                np.testing.assert_array_equal(boxes[i, k], ref_box(maps[i, k], t))
    np.testing.assert_array_equal(boxes[1, 2], metrics.EMPTY_BOX)


def test_localization_box_hand_made():
    m = np.zeros((1, 10, 12), np.float32)
    m[0, 1:3, 1:3] = 1.0  # 4 pixels, the maximum
    m[0, 5:9, 4:10] = 0.2  # 24 pixels above 15%: the largest segment
    m[0, 9, 0] = 0.1  # below 15%
    np.testing.assert_array_equal(np.asarray(metrics.localization_box(m)), [[5, 4, 8, 9]])
    # Diagonal touching joins segments with 8-connectivity only.
    d = np.zeros((1, 6, 6), np.float32)
    d[0, 0:2, 0:2] = 1.0
    d[0, 2:4, 2:4] = 1.0
    d[0, 5, 5] = 1.0
    np.testing.assert_array_equal(np.asarray(metrics.localization_box(d, connectivity=8)), [[0, 0, 3, 3]])
    np.testing.assert_array_equal(np.asarray(metrics.localization_box(d, connectivity=4)), [[0, 0, 1, 1]])


def test_box_iou_matches_reference(rng):
    a = rng.integers(-1, 12, size=(50, 4))
    b = rng.integers(-1, 12, size=(50, 4))
    got = np.asarray(metrics.box_iou(a, b))
    np.testing.assert_allclose(got, [ref_iou(x, y) for x, y in zip(a, b, strict=False)], rtol=1e-6)
    assert float(metrics.box_iou(np.array([2, 3, 5, 7]), np.array([2, 3, 5, 7]))) == 1.0
    assert float(metrics.box_iou(np.array(metrics.EMPTY_BOX), np.array(metrics.EMPTY_BOX))) == 0.0


def test_boxes_to_masks(rng):
    boxes = np.array([[[1, 2, 3, 4], [5, 5, 6, 9]], [[0, 0, 0, 0], [2, 2, 1, 1]]])
    valid = np.array([[True, True], [True, False]])
    got = np.asarray(metrics.boxes_to_masks(boxes, (8, 10), valid))
    want = np.zeros((2, 8, 10), bool)
    want[0, 1:4, 2:5] = want[0, 5:7, 5:10] = True
    want[1, 0, 0] = True
    np.testing.assert_array_equal(got, want)


def test_localization_errors_top1_top5():
    h = w = 20
    gt = np.array([[2, 2, 9, 9], [10, 10, 17, 17], [0, 0, 19, 19]])
    labels = np.array([3, 7, 1])
    maps = np.zeros((3, 5, h, w), np.float32)
    classes = np.array([[3, 0, 1, 2, 4], [1, 2, 7, 4, 5], [0, 2, 3, 4, 6]])
    maps[0, 0, 2:10, 2:10] = 1.0  # right class first, right box: correct at top-1
    maps[1, 2, 11:18, 11:18] = 1.0  # right class third, 49/64 IoU: correct at top-5 only
    maps[1, 0, 10:18, 10:18] = 1.0  # wrong class, right place: not correct
    maps[2, :, 0:3, 0:3] = 1.0  # label 1 never guessed
    res = metrics.localization_errors(maps, classes, gt, labels)
    assert res.correct.shape == (3, 5)
    np.testing.assert_array_equal(
        np.asarray(res.correct[:, :3]), [[True, False, False], [False, False, True], [False, False, False]]
    )
    assert float(res.top1_error) == pytest.approx(2 / 3)
    assert float(res.top5_error) == pytest.approx(1 / 3)
    assert float(res.iou[1, 2]) == pytest.approx(ref_iou([11, 11, 17, 17], gt[1]))
    # IoU threshold 0.8 rejects the 49/64 box
    strict = metrics.localization_correct(res.boxes, classes, gt, labels, iou_threshold=0.8)
    assert not bool(strict[1, 2])
    # several ground-truth boxes per image, one of them missing
    gt2 = np.stack([gt, gt[[2, 0, 1]]], axis=1)  # (3, 2, 4)
    lab2 = np.stack([labels, labels[[2, 0, 1]]], axis=1)
    valid = np.array([[True, False], [True, True], [True, True]])
    c2 = metrics.localization_correct(res.boxes, classes, gt2, lab2, valid)
    np.testing.assert_array_equal(np.asarray(c2[:, 0]), [True, False, False])


# --------------------------------------------------------------------------------------------
# Pointing game
# --------------------------------------------------------------------------------------------


@JIT_OR_NOT
@pytest.mark.parametrize("tolerance", [0, 1.5, 3, 15])
def test_pointing_game_matches_distance_transform(rng, wrap, tolerance):
    maps = smooth_maps(rng, 24, 30, 40, sigma=3.0) + rng.random((24, 30, 40)).astype(np.float32) * 1e-3
    masks = np.zeros((24, 30, 40), bool)
    for i in range(24):
        y0, x0 = rng.integers(0, 25), rng.integers(0, 35)
        masks[i, y0 : y0 + rng.integers(1, 6), x0 : x0 + rng.integers(1, 6)] = True
    got = np.asarray(wrap(lambda m, k: metrics.pointing_game(m, k, tolerance))(maps, masks))
    want = []
    for m, k in zip(maps, masks, strict=False):
        peak = np.unravel_index(np.argmax(m), m.shape)
        dist = ndimage.distance_transform_edt(~k)  # distance to the nearest object pixel
        want.append(dist[peak] <= tolerance)
    np.testing.assert_array_equal(got, want)
    if tolerance == 0:
        assert 0 < np.mean(want) < 1 or True  # hits and misses both possible


def test_pointing_game_boxes_and_ties():
    m = np.zeros((2, 10, 10), np.float32)
    m[0, 4, 4] = 1.0
    m[1] = 0.5  # constant map: the peak is the first pixel, (0, 0)
    boxes = np.array([[4, 4, 5, 5], [3, 3, 6, 6]])
    np.testing.assert_array_equal(np.asarray(metrics.pointing_game(m, boxes)), [True, False])
    # (0, 0) to the box's corner (3, 3): distance sqrt(18) = 4.24
    np.testing.assert_array_equal(np.asarray(metrics.pointing_game(m, boxes, tolerance=4.2)), [True, False])
    np.testing.assert_array_equal(np.asarray(metrics.pointing_game(m, boxes, tolerance=4.3)), [True, True])
    with pytest.raises(ValueError, match="masks must be"):
        metrics.pointing_game(m, np.zeros((2, 5, 5), bool))


# --------------------------------------------------------------------------------------------
# Saliency order, blur
# --------------------------------------------------------------------------------------------


def test_saliency_order_breaks_ties_by_index(rng):
    maps = np.round(rng.random((4, 9, 7)) * 4).astype(np.float32) / 4  # many ties
    maps[0, 0, 0] = -0.0
    order = np.asarray(metrics.saliency_order(maps))
    ranks = np.asarray(metrics.saliency_ranks(maps))
    for m, o, r in zip(maps, order, ranks, strict=False):
        want = np.argsort(-m.ravel(), kind="stable")
        np.testing.assert_array_equal(o, want)
        np.testing.assert_array_equal(r.ravel()[want], np.arange(m.size))


@pytest.mark.parametrize("sigma,size", [(1.0, 16), (5.0, 32), (5.0, 12)])
def test_gaussian_blur_matches_scipy(rng, sigma, size):
    x = rng.normal(size=(2, size, size + 3, 3)).astype(np.float32)
    got = np.asarray(metrics.gaussian_blur(x, sigma))
    want = np.stack(
        [
            ndimage.gaussian_filter(
                im.astype(np.float64), sigma=(sigma, sigma, 0), mode="reflect", truncate=4.0
            )
            for im in x
        ]
    )
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_pixel_saliency(rng):
    a = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(metrics.pixel_saliency(a)), np.abs(a).sum(-1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics.pixel_saliency(a, "abs_max")), np.abs(a).max(-1), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(metrics.pixel_saliency(a, "l2")), np.linalg.norm(a, axis=-1), rtol=1e-5
    )


# --------------------------------------------------------------------------------------------
# Deletion / insertion, confidence change
# --------------------------------------------------------------------------------------------


@JIT_OR_NOT
def test_deletion_matches_numpy(rng, wrap):
    b, h, w, c = 3, 6, 5, 2
    fn, np_fn = linear_model(rng, h, w, c)
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    maps = np.round(rng.random((b, h, w)) * 5).astype(np.float32)  # ties
    target = np.array([0, 3, 1])
    baseline = 0.25
    got = wrap(lambda x, m, t: metrics.deletion(fn, x, m, t, n_steps=7, baseline=baseline, chunk_size=4))(
        x, maps, target
    )
    auc, curve, fr = ref_curve(np_fn, x, maps, target, 7, x, np.full_like(x, baseline))
    np.testing.assert_allclose(np.asarray(got.scores), curve, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got.auc), auc, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got.fractions), fr, atol=1e-7)


def test_insertion_matches_numpy_and_chunking_does_not_matter(rng):
    b, h, w, c = 4, 8, 8, 3
    fn, np_fn = linear_model(rng, h, w, c)
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    maps = rng.random((b, h, w)).astype(np.float32)
    target = np.argmax(np_fn(x), axis=-1)
    canvas = np.stack(
        [ndimage.gaussian_filter(im, sigma=(2.0, 2.0, 0), mode="reflect", truncate=4.0) for im in x]
    )
    auc, curve, _ = ref_curve(np_fn, x, maps, target, 10, canvas, x)
    for chunk in (7, 64):
        got = metrics.insertion(fn, x, maps, None, n_steps=10, blur_sigma=2.0, chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(got.scores), curve, atol=3e-5)
        np.testing.assert_allclose(np.asarray(got.auc), auc, atol=3e-5)
    # an explicit canvas
    got = metrics.insertion(fn, x, maps, target, n_steps=3, canvas=0.0)
    _, curve0, _ = ref_curve(np_fn, x, maps, target, 3, np.zeros_like(x), x)
    np.testing.assert_allclose(np.asarray(got.scores), curve0, atol=3e-5)


def test_removal_curves_validate_arguments(rng):
    fn, _ = linear_model(rng, 4, 4, 1)
    x = np.zeros((2, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="maps"):
        metrics.deletion(fn, x, np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="pixel_saliency"):
        metrics.deletion(fn, x, np.zeros((2, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match="out of range"):
        metrics.insertion(fn, x, np.zeros((2, 4, 4), np.float32), target=9)
    with pytest.raises(ValueError, match="n_steps"):
        metrics.deletion(fn, x, np.zeros((2, 4, 4), np.float32), n_steps=0)
    tap, _ = metrics.colour_detector()  # a tap is used through its scores
    with pytest.raises(ValueError, match="3 classes"):
        metrics.deletion(tap, np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 8, 8), np.float32), target=3)


@JIT_OR_NOT
def test_confidence_change_matches_numpy(rng, wrap):
    b, h, w, c = 6, 5, 5, 3
    fn, np_fn = linear_model(rng, h, w, c)
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    maps = rng.random((b, h, w)).astype(np.float32)
    maps[0] = 1.0  # unchanged image: no drop, no increase
    target = np.array([0, 1, 2, 3, 0, 1])
    got = wrap(lambda x, m, t: metrics.confidence_change(fn, x, m, t, chunk_size=5))(x, maps, target)
    y = ref_softmax(np_fn(x))[np.arange(b), target]
    o = ref_softmax(np_fn(x * maps[..., None]))[np.arange(b), target]
    np.testing.assert_allclose(np.asarray(got.clean), y, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.masked), o, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.drop), np.maximum(y - o, 0) / y * 100, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(got.increase)[1:], (o > y)[1:])
    assert float(got.drop[0]) == pytest.approx(0.0, abs=1e-3)
    # with a baseline: masked = baseline + L (x - baseline)
    got = metrics.confidence_change(fn, x, maps, target, baseline=-1.0, softmax=False)
    np.testing.assert_allclose(
        np.asarray(got.masked), np_fn(-1 + maps[..., None] * (x + 1))[np.arange(b), target], atol=1e-4
    )


# --------------------------------------------------------------------------------------------
# ROAD
# --------------------------------------------------------------------------------------------


def test_imputation_solves_the_road_system(rng):
    x = rng.normal(size=(3, 12, 10, 2)).astype(np.float32)
    removed = rng.random((3, 12, 10)) < np.array([0.2, 0.6, 0.9])[:, None, None]
    removed[0, :3, :3] = True  # a removed corner (border weights)
    got = np.asarray(metrics.noisy_linear_imputation(x, removed, noise=0.0, tol=1e-6, max_iter=5000))
    for i in range(3):
        np.testing.assert_allclose(got[i], ref_impute(x[i], removed[i]), atol=1e-4)
    # kept pixels are untouched, exactly
    np.testing.assert_array_equal(got[~removed], x[~removed])


def test_imputation_noise_only_on_removed_pixels(rng):
    x = np.full((2, 16, 16, 3), 0.5, np.float32)
    removed = np.zeros((2, 16, 16), bool)
    removed[:, 4:12, 4:12] = True
    a = np.asarray(metrics.noisy_linear_imputation(x, removed, jax.random.key(1), noise=0.1))
    b = np.asarray(metrics.noisy_linear_imputation(x, removed, jax.random.key(1), noise=0.1))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[~removed], x[~removed])
    resid = a[removed] - 0.5  # a constant image imputes to the constant
    assert abs(resid.mean()) < 0.02 and 0.08 < resid.std() < 0.12
    with pytest.raises(ValueError, match="key"):
        metrics.noisy_linear_imputation(x, removed, noise=0.1)


def test_road_matches_numpy(rng):
    b, h, w, c = 2, 8, 8, 2
    fn, np_fn = linear_model(rng, h, w, c)
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    maps = np.round(rng.random((b, h, w)) * 6).astype(np.float32)
    target = np.array([1, 2])
    fractions = (0.25, 0.5, 0.8)
    got = metrics.road(
        fn, x, maps, target, fractions=fractions, noise=0.0, chunk_size=5, tol=1e-6, max_iter=5000
    )
    for i in range(b):
        order = np.argsort(-maps[i].ravel(), kind="stable")
        for j, f in enumerate(fractions):
            n = int(round(f * h * w))
            for lerf, curve, ok in ((False, got.morf, got.morf_correct), (True, got.lerf, got.lerf_correct)):
                removed = np.zeros(h * w, bool)
                removed[order[h * w - n :] if lerf else order[:n]] = True
                xi = ref_impute(x[i], removed.reshape(h, w))
                s = np_fn(xi[None])
                assert float(curve[i, j]) == pytest.approx(ref_softmax(s)[0, target[i]], abs=2e-4)
                assert bool(ok[i, j]) == (np.argmax(s) == target[i])
    np.testing.assert_allclose(
        np.asarray(got.gap), np.mean(np.asarray(got.lerf) - np.asarray(got.morf), axis=1), rtol=1e-6
    )
    # the noise draw does not depend on the chunking
    k = jax.random.key(3)
    r1 = metrics.road(
        fn, x, maps, target, key=k, fractions=fractions, chunk_size=5, tol=1e-6, max_iter=5000
    )  # same compile
    r2 = metrics.road(fn, x, maps, target, key=k, fractions=fractions, chunk_size=64, tol=1e-6, max_iter=5000)
    np.testing.assert_allclose(np.asarray(r1.morf), np.asarray(r2.morf), atol=1e-5)
    np.testing.assert_allclose(np.asarray(r1.lerf), np.asarray(r2.lerf), atol=1e-5)
    assert not np.allclose(np.asarray(r1.morf), np.asarray(got.morf), atol=1e-5)  # the noise is there


# --------------------------------------------------------------------------------------------
# Rank correlation, SSIM, faithfulness
# --------------------------------------------------------------------------------------------


@JIT_OR_NOT
def test_spearman_matches_scipy_with_ties(rng, wrap):
    a = np.round(rng.normal(size=(5, 30, 20)) * 2).astype(np.float32)  # heavy ties
    b = (a + rng.normal(size=a.shape) * 2).astype(np.float32)
    b[1] = np.maximum(b[1], 0)  # a ReLU'd map: many zeros
    for absolute in (False, True):
        got = np.asarray(wrap(lambda a, b, ab=absolute: metrics.spearman(a, b, absolute=ab))(a, b))
        f = np.abs if absolute else (lambda z: z)
        want = [stats.spearmanr(f(x).ravel(), f(y).ravel()).statistic for x, y in zip(a, b, strict=False)]
        np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(
        np.asarray(metrics.rankdata(a)).reshape(5, -1),
        np.stack([stats.rankdata(x.ravel()) for x in a]),
        rtol=0,
        atol=0,
    )
    np.testing.assert_allclose(
        np.asarray(metrics.faithfulness(a, b)),
        [stats.spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b, strict=False)],
        atol=2e-5,
    )


def test_spearman_large_maps_and_constant_maps(rng):
    a = ndimage.gaussian_filter(rng.normal(size=(2, 224, 224)), (0, 8, 8)).astype(np.float32)
    b = (a + rng.normal(size=a.shape) * a.std()).astype(np.float32)
    got = np.asarray(metrics.spearman(np.maximum(a, 0), b))
    want = [
        stats.spearmanr(np.maximum(x, 0).ravel(), y.ravel()).statistic for x, y in zip(a, b, strict=False)
    ]
    np.testing.assert_allclose(got, want, atol=1e-4)
    const = np.zeros((1, 10, 10), np.float32)
    assert float(metrics.spearman(const, b[:1, :10, :10])[0]) == 0.0
    assert float(metrics.pearson(const, b[:1, :10, :10])[0]) == 0.0


def test_ssim_matches_numpy_reference(rng):
    a = ndimage.gaussian_filter(rng.random((3, 40, 36)), (0, 2, 2)).astype(np.float32)
    b = np.clip(a + rng.normal(size=a.shape) * 0.05, 0, 1).astype(np.float32)
    b[2] = a[2]
    got = np.asarray(metrics.ssim(a, b))
    np.testing.assert_allclose(got, [ref_ssim(x, y) for x, y in zip(a, b, strict=False)], atol=1e-4)
    assert got[2] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="window"):
        metrics.ssim(a[:, :8, :8], b[:, :8, :8])


def test_ssim_matches_scikit_image(rng):
    import skimage.metrics as skm

    a = ndimage.gaussian_filter(rng.random((2, 33, 47)), (0, 1.5, 1.5)).astype(np.float32)
    b = np.clip(a * 0.8 + rng.random(a.shape) * 0.2, 0, 1).astype(np.float32)
    got = np.asarray(metrics.ssim(a, b, data_range=1.0))
    want = [
        skm.structural_similarity(
            x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        for x, y in zip(a, b, strict=False)
    ]
    np.testing.assert_allclose(got, want, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Sanity checks
# --------------------------------------------------------------------------------------------


def _linen_net():
    module, variables = nets.linen(nets.weights(0))
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
    # "Re-initialised" weights: the same architecture's weights from another seed (module.init
    # with a new key does the same, but compiles Flax's initialisers).
    _, random_variables = nets.linen(nets.weights(42))
    return module, variables, random_variables, x


def test_randomize_layers_replaces_only_the_named_layers():
    module, variables, random_variables, _ = _linen_net()
    out = metrics.randomize_layers(variables, ["fc", "block3/conv"], random_variables=random_variables)
    p, p0, pr = out["params"], variables["params"], random_variables["params"]
    np.testing.assert_array_equal(p["fc"]["kernel"], pr["fc"]["kernel"])
    np.testing.assert_array_equal(p["block3"]["conv"]["kernel"], pr["block3"]["conv"]["kernel"])
    np.testing.assert_array_equal(p["block2"]["conv"]["kernel"], p0["block2"]["conv"]["kernel"])
    assert not np.array_equal(p0["fc"]["kernel"], p["fc"]["kernel"])
    # by permutation: same values, another arrangement
    perm = metrics.randomize_layers(variables, ["block2"], key=jax.random.key(0))
    k0 = np.asarray(variables["params"]["block2"]["conv"]["kernel"])
    k1 = np.asarray(perm["params"]["block2"]["conv"]["kernel"])
    np.testing.assert_array_equal(np.sort(k0.ravel()), np.sort(k1.ravel()))
    assert not np.array_equal(k0, k1)
    with pytest.raises(ValueError, match="block9"):
        metrics.randomize_layers(variables, ["block9"], key=jax.random.key(0))


def test_cascading_randomization_is_cumulative():
    module, variables, random_variables, _ = _linen_net()
    layers = ["fc", "block3", "block2"]
    steps = metrics.cascading_randomization(variables, layers, random_variables=random_variables)
    assert [s for s, _ in steps] == ["original"] + layers
    for i, (_, v) in enumerate(steps):
        for j, layer in enumerate(layers):
            src = random_variables if j < i else variables
            for a, b in zip(
                jax.tree_util.tree_leaves(v["params"][layer]),
                jax.tree_util.tree_leaves(src["params"][layer]),
                strict=False,
            ):
                np.testing.assert_array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(v["params"]["block1"]),
            jax.tree_util.tree_leaves(variables["params"]["block1"]),
            strict=False,
        ):
            np.testing.assert_array_equal(a, b)


def test_sanity_check_similarities_match_scipy():
    module, variables, random_variables, x = _linen_net()
    tap = gcj.linen_tap(module, variables, "block2")
    target = jnp.argmax(module.apply(variables, x), axis=-1)
    explain = lambda v, x: gcj.grad_cam(tap.with_params(v), x, target)  # noqa: E731
    layers = ["fc", "block3", "block2"]
    res = metrics.sanity_check(
        explain, variables, layers, x, random_variables=random_variables, keep_maps=True
    )
    assert res.steps == ("original", "fc", "block3", "block2")
    base = np.asarray(explain(variables, x))
    v = variables
    for i, layer in enumerate(layers, start=1):
        v = metrics.randomize_layers(v, [layer], random_variables=random_variables)
        m = np.asarray(explain(v, x))
        np.testing.assert_allclose(np.asarray(res.maps[i]), m, atol=1e-6)
        for j in range(x.shape[0]):
            if np.ptp(m[j]) == 0 or np.ptp(base[j]) == 0:
                assert res.similarity["spearman"][i, j] == 0.0
                continue
            rho = stats.spearmanr(base[j].ravel(), m[j].ravel()).statistic
            assert res.similarity["spearman"][i, j] == pytest.approx(rho, abs=1e-4)
            unit = lambda z: np.abs(z) / np.abs(z).max()  # noqa: E731
            assert res.similarity["ssim"][i, j] == pytest.approx(
                ref_ssim(unit(base[j]), unit(m[j])), abs=1e-4
            )
    np.testing.assert_allclose(res.mean("spearman")[0], 1.0, atol=1e-6)
    assert "original" in res.table()


def test_sanity_check_grad_cam_changes_guided_backprop_does_not():
    """Adebayo et al.'s finding, on the small conv net: randomising the layers above and at the
    tapped layer decorrelates Grad-CAM far more than Guided Backprop."""
    module, variables, random_variables, _ = _linen_net()
    x = jax.random.uniform(jax.random.key(5), (4, 24, 24, 3))
    tap = gcj.linen_tap(module, variables, "block2")
    target = jnp.argmax(module.apply(variables, x), axis=-1)
    layers = ["fc", "block3", "block2"]
    gc = metrics.sanity_check(
        lambda v, x: gcj.grad_cam(tap.with_params(v), x, target),
        variables,
        layers,
        x,
        random_variables=random_variables,
    )
    gb = metrics.sanity_check(
        lambda v, x: gcj.guided_backprop(tap.with_params(v), x, target),
        variables,
        layers,
        x,
        random_variables=random_variables,
    )
    assert gb.mean("spearman_abs")[-1] > gc.mean("spearman_abs")[-1] + 0.2


# --------------------------------------------------------------------------------------------
# End to end: a synthetic task with known boxes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    data = metrics.boxes_dataset(0, 24, 32)
    tap, fn = metrics.colour_detector()
    maps = gcj.grad_cam(tap, data.images, data.labels)
    # The same values at shuffled positions: a map with Grad-CAM's histogram and no localisation.
    r = np.random.default_rng(1)
    flat = np.asarray(maps).reshape(24, -1)
    shuffled = np.stack([row[r.permutation(row.size)] for row in flat]).reshape(maps.shape)
    return data, fn, maps, jnp.asarray(shuffled)


def test_synthetic_model_classifies_the_dataset(synthetic):
    data, fn, _, _ = synthetic
    np.testing.assert_array_equal(np.argmax(fn(data.images), -1), data.labels)


def test_grad_cam_localises_synthetic_objects_and_a_shuffled_map_does_not(synthetic):
    data, fn, maps, shuffled = synthetic
    gt = np.asarray(data.boxes)
    for m, good in ((maps, True), (shuffled, False)):
        boxes = np.asarray(metrics.localization_box(m))
        iou = np.array([ref_iou(b, g) for b, g in zip(boxes, gt, strict=False)])
        loc = metrics.localization_errors(m, data.labels, data.boxes, data.labels)
        hits = np.asarray(metrics.pointing_game(m, data.masks))
        if good:
            assert iou.min() >= 0.5 and float(loc.top1_error) == 0.0 and hits.all()
        else:
            assert iou.mean() < 0.35 and float(loc.top1_error) > 0.7 and hits.mean() < 0.5


def test_synthetic_perturbation_metrics_prefer_grad_cam(synthetic):
    data, fn, maps, shuffled = synthetic
    key = jax.random.key(0)
    res = {
        name: metrics.evaluate(
            fn,
            data.images,
            m,
            data.labels,
            key=key,
            boxes=data.boxes,
            labels=data.labels,
            n_steps=16,
            road_fractions=(0.1, 0.3, 0.5),
            chunk_size=128,
        )
        for name, m in (("grad_cam", maps), ("shuffled", shuffled))
    }
    report = metrics.Report("synthetic")
    for name, values in res.items():
        report.add(name, **values)
    better = report.better("grad_cam", "shuffled")
    assert set(better) >= {
        "deletion",
        "insertion",
        "avg_drop",
        "road_morf",
        "road_gap",
        "iou",
        "pointing",
        "loc_error",
    }
    wins = {k: v for k, v in better.items() if k != "increase"}
    assert all(wins.values()), (wins, report.table())
    text = report.table(sem=True)
    assert "grad_cam" in text and "deletion AUC ↓" in text and "insertion AUC ↑" in text
    # the table's numbers are the means of the per-image values
    assert report.mean("grad_cam", "deletion") == pytest.approx(float(np.mean(res["grad_cam"]["deletion"])))
    assert report.mean("grad_cam", "pointing") == pytest.approx(100.0)


def test_faithfulness_to_occlusion_on_synthetic(synthetic):
    from gradcam_jax.perturbation import occlusion

    data, fn, maps, shuffled = synthetic
    occ = occlusion(fn, data.images[:8], data.labels[:8], window=6, stride=3)
    f_gc = np.asarray(metrics.faithfulness(maps[:8], occ))
    f_sh = np.asarray(metrics.faithfulness(shuffled[:8], occ))
    want = [
        stats.spearmanr(np.asarray(a).ravel(), np.asarray(b).ravel()).statistic
        for a, b in zip(maps[:8], occ, strict=False)
    ]
    np.testing.assert_allclose(f_gc, want, atol=1e-4)
    assert f_gc.mean() > 0.5 > f_sh.mean() + 0.3
