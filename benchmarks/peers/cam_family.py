"""The rest of pytorch-grad-cam's CAM family (issue 15): ours and its implementations, agreement rows.

Methods: Grad-CAM element-wise, ShapleyCAM (with the ReST target the paper pairs it with, so that
the Hessian-vector product is not zero), Finer-CAM, KPCA-CAM, FullGrad (ResNet-50: every
BatchNorm), Deep Feature Factorization (its NMF start), and ``aug_smooth`` / ``eigen_smooth`` on
Grad-CAM and Grad-CAM++. Each peer run explains the same class per image as ours (our model's top
class), except Finer-CAM, which both sides run with its default (the top class).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_jax as gcj
from gradcam_jax.methods import channel_terms, first_component, kpca_cam

from .common import FAMILY, PGC
from .measure import Impl

N_CONCEPTS = 5
BN_LAYERS = ["**/bn*", "**/downsample_bn"]  # every BatchNorm of gradcam_jax.models.resnet

_SMOOTHED = {
    "grad_cam_aug": ("grad_cam", {"aug_smooth": True}),
    "grad_cam_eigen": ("grad_cam", {"eigen_smooth": True}),
    "grad_cam_plus_plus_aug": ("grad_cam_plus_plus", {"aug_smooth": True}),
    "grad_cam_plus_plus_eigen": ("grad_cam_plus_plus", {"eigen_smooth": True}),
}


def rest_target(classes, scores):
    """The ReST target (Cai 2024): ``y_c - CE(y, c) = y_c + log softmax(y)_c``."""
    pick = functools.partial(jnp.take_along_axis, indices=classes[:, None].astype(jnp.int32), axis=-1)
    return (pick(scores) + pick(jax.nn.log_softmax(scores, axis=-1)))[:, 0]


def fullgrad_setup(pair):
    """Our FullGrad's tap (every BatchNorm) and biases for the ResNet-50 pair."""
    if pair.key != "resnet50":
        raise NotImplementedError("the FullGrad rows map ResNet-50's BatchNorm layers only")
    tap = gcj.linen_tap(pair.module, pair.variables, layers=BN_LAYERS)
    names = list(gcj.activations_and_grads(tap, jnp.zeros((1, 64, 64, 3)), 0).activation)
    return tap, gcj.linen_biases(pair.variables, names)


def sklearn_random_init(v, n):
    """scikit-learn's ``NMF(init="random", random_state=0)`` start for ``V`` (its documented recipe:
    ``|N(0, 1)| * sqrt(mean(V) / n)``, ``H`` drawn before ``W`` from ``RandomState(0)``)."""
    avg = np.sqrt(v.mean() / n)
    rng = np.random.RandomState(0)
    h = np.abs(avg * rng.standard_normal(size=(n, v.shape[1])).astype(v.dtype, copy=False))
    w = np.abs(avg * rng.standard_normal(size=(v.shape[0], n)).astype(v.dtype, copy=False))
    return w, h


def activation_matrix(pair, x):
    """pytorch-grad-cam's DFF matrix from our activation: channels x (images x positions), shifted."""
    _, a = gcj.linen_tap(pair.module, pair.variables, pair.layer)(x)
    v = np.asarray(a, np.float32).reshape(-1, a.shape[-1]).T
    return v - v.min(axis=1, keepdims=True)


def ours_family(method, pair, x, t, compile_ours, precision):
    """Our implementation of a family method, AOT-compiled (``compile_ours`` from implementations)."""
    tap = pair.tap
    if method in _SMOOTHED:
        base, kw = _SMOOTHED[method]
        return compile_ours(
            "gradcam_jax", lambda tap, x, t: gcj.cam(tap, x, t, base, **kw), (tap, x, t), precision
        )
    if method == "shapley_cam":
        fn = lambda tap, x, t: gcj.shapley_cam(tap, x, functools.partial(rest_target, t))  # noqa: E731
        return compile_ours("gradcam_jax", fn, (tap, x, t), precision)
    if method == "fullgrad":
        ftap, biases = fullgrad_setup(pair)
        fn = lambda tap, x, t, b: gcj.fullgrad(tap, x, t, biases=b)  # noqa: E731
        return compile_ours("gradcam_jax", fn, (ftap, x, t, biases), precision)
    if method == "dff":
        init = tuple(jnp.asarray(m) for m in sklearn_random_init(activation_matrix(pair, x), N_CONCEPTS))
        fn = lambda tap, x, init: gcj.deep_feature_factorization(tap, x, N_CONCEPTS, init=init).maps  # noqa: E731
        return compile_ours("gradcam_jax", fn, (tap, x, init), precision)
    return compile_ours("gradcam_jax", lambda tap, x, t: gcj.cam(tap, x, t, method), (tap, x, t), precision)


def pgc_run(b, make, call, release=None):
    """A pytorch-grad-cam object built in ``setup``, ``call(obj)`` timed, released in ``teardown``."""
    holder = {}

    def setup():
        holder["obj"] = make()

    def teardown():
        obj = holder.pop("obj")
        (release or (lambda o: o.activations_and_grads.release()))(obj)

    return Impl(PGC, lambda: call(holder["obj"]), setup=setup, teardown=teardown, torch=b.torch)


def pgc_family(method, b, extra):
    """pytorch-grad-cam's implementation of a family method (timed); agreement-only runs to ``extra``."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget

    model, layers = b.pair.torch_model, b.pair.torch_layers_pgc
    targets = [ClassifierOutputTarget(int(c)) for c in b.targets]
    if method in _SMOOTHED:
        base, kw = _SMOOTHED[method]
        cls = pgc.GradCAM if base == "grad_cam" else pgc.GradCAMPlusPlus
        return [pgc_run(b, lambda: cls(model=model, target_layers=layers), lambda c: c(b.x, targets, **kw))]
    if method == "shapley_cam":
        rest = [ClassifierOutputReST(int(c)) for c in b.targets]
        return [pgc_run(b, lambda: pgc.ShapleyCAM(model=model, target_layers=layers), lambda c: c(b.x, rest))]
    if method == "finer_cam":
        return [
            pgc_run(
                b,
                lambda: pgc.FinerCAM(model=model, target_layers=layers),
                lambda c: c(b.x),
                lambda c: c.base_cam.activations_and_grads.release(),
            )
        ]
    if method == "fullgrad":
        return [pgc_run(b, lambda: pgc.FullGrad(model=model, target_layers=[]), lambda c: c(b.x, targets))]
    if method == "dff":
        return [pgc_dff(b, extra)]
    cls = {"grad_cam_elementwise": pgc.GradCAMElementWise, "kpca_cam": pgc.KPCA_CAM}[method]
    return [pgc_run(b, lambda: cls(model=model, target_layers=layers), lambda c: c(b.x, targets))]


def pgc_dff(b, extra):
    """pytorch-grad-cam's DeepFeatureFactorization (scikit-learn NMF, coordinate descent); and, for
    the agreement table only, scikit-learn's multiplicative-update solver from the same start."""
    from pytorch_grad_cam import DeepFeatureFactorization

    def run(dff):
        _, maps = dff(b.x, N_CONCEPTS)
        return np.stack(maps)

    def mu_same_start():
        from sklearn.decomposition import NMF

        with b.torch.no_grad():
            feats = {}
            hook = b.pair.torch_layers_pgc[0].register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
            b.pair.torch_model(b.xe)
            hook.remove()
        a = feats["a"].float().cpu().numpy()  # (B, C, h, w)
        v = a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1)
        v = v - v.min(axis=1, keepdims=True)
        w0, h0 = sklearn_random_init(v, N_CONCEPTS)
        model = NMF(N_CONCEPTS, init="custom", solver="mu", max_iter=200, tol=0.0)
        model.fit_transform(v.astype(np.float64), W=w0.astype(np.float64), H=h0.astype(np.float64))
        h = model.components_.reshape(N_CONCEPTS, a.shape[0], *a.shape[2:]).transpose(1, 0, 2, 3)
        import torch.nn.functional as F

        up = F.interpolate(b.torch.from_numpy(h).float(), size=b.size, mode="bilinear", align_corners=False)
        return minmax_np(up.numpy())

    extra.append(("scikit-learn", "mu_same_start", mu_same_start))
    return pgc_run(
        b,
        lambda: DeepFeatureFactorization(model=b.pair.torch_model, target_layer=b.pair.torch_layers_pgc[0]),
        run,
    )


def minmax_np(m):
    lo = m.min(axis=(-2, -1), keepdims=True)
    hi = m.max(axis=(-2, -1), keepdims=True)
    return np.where(hi > lo, (m - lo) / np.where(hi > lo, hi - lo, 1), 0)


# --------------------------------------------------------------------------------------------
# Agreement


def matched_components(ours, peer):
    """Each of our concept maps paired with the peer's best-correlated one (NMF has no order):
    the peer's maps reordered to ours, ``(B, n, H, W)``."""
    n = ours.shape[1]
    flat_o = np.moveaxis(ours, 1, 0).reshape(n, -1)
    flat_p = np.moveaxis(peer, 1, 0).reshape(n, -1)
    corr = np.corrcoef(flat_o, flat_p)[:n, n:]
    order, used = [], set()
    for i in np.argsort(-corr.max(axis=1)):  # greedy, most certain first
        j = max((j for j in range(n) if j not in used), key=lambda j: corr[i, j])
        used.add(j)
        order.append((i, j))
    perm = [j for _, j in sorted(order)]
    return peer[:, perm]


FAMILY_NOTES = {
    "family_same": "Same convention on both sides (pytorch-grad-cam's formula, ReLU, bilinear half-pixel "
    "resize, per-map min-max).",
    "shapley": "ShapleyCAM with the ReST target y_c + log softmax(y)_c on both sides, so that the "
    "Hessian-vector product term is not zero (at ResNet-50's last stage the layers above are "
    "pooling and a linear layer: with a logit target H = 0 and ShapleyCAM is Grad-CAM).",
    "finer": "Finer-CAM with the defaults on both sides: the top class against the classes ranked 1-3 "
    "by score distance, alpha = 1, Grad-CAM as the base method.",
    "kpca_sign": "The sign of a kernel principal component is arbitrary: scikit-learn makes the "
    "largest entry positive, ours correlates positively with the mean activation; after the "
    "final ReLU an image whose signs differ gets a different map.",
    "kpca_matched": "Evidence for the previous note: our KPCA-CAM with scikit-learn's sign rule "
    "(largest |entry| positive).",
    "eigen_sign": "The sign of a principal component is arbitrary: pytorch-grad-cam keeps LAPACK's, ours "
    "correlates positively with the mean of the terms; after the ReLU an image whose signs "
    "differ gets a different map.",
    "eigen_matched": "Evidence: ours with the component's sign chosen per image to agree with the peer "
    "(both signs computed; the better kept).",
    "eigen_eps": "Evidence: the principal component of Grad-CAM++'s terms moves with its channel weights, "
    "and pytorch-grad-cam adds 1e-6 to their denominator (see the Grad-CAM++ rows; at 224 px the "
    "gradients at the 7x7 layer are small enough for it to matter): ours with that epsilon.",
    "aug": "aug_smooth on both sides: the image, x0.9, x1.1 and their mirror images, each map normalised "
    "and mirrored back, averaged (ours normalises the mean again: the correlation does not see it). "
    "Grad-CAM++ keeps pytorch-grad-cam's 1e-6 in its denominator (see the Grad-CAM++ rows).",
    "fullgrad": "FullGrad with every BatchNorm (inference bias beta - mean gamma / sqrt(var + eps)) on "
    "both sides: per-channel min-max at the layer's resolution, resized (bilinear, half-pixel), "
    "summed, with |grad x input|.",
    "dff_solver": "Deep Feature Factorization from the same NMF start (scikit-learn's random init, "
    "random_state=0): pytorch-grad-cam runs scikit-learn's coordinate-descent solver, ours "
    "multiplicative updates (200 each), so the factorisations can differ; concepts matched by "
    "best correlation (NMF has no order).",
    "dff_mu": "Evidence: scikit-learn's NMF(solver='mu') from the same start on the same matrix, "
    "against ours: the same algorithm, the same concepts.",
}


def kpca_sklearn_sign(a, g):
    """KPCA-CAM with scikit-learn's sign rule (largest |entry| positive): agreement evidence only."""
    m = kpca_cam(a, g)
    flat = m.reshape(m.shape[0], -1)
    big = jnp.take_along_axis(flat, jnp.argmax(jnp.abs(flat), axis=1)[:, None], axis=1)
    return m * jnp.where(big < 0, -1.0, 1.0).reshape((-1,) + (1,) * (m.ndim - 1))


def eigen_pp_eps(a, g, eps=1e-6):
    """Eigen-smoothed Grad-CAM++ with pytorch-grad-cam's 1e-6 in alpha's denominator (evidence only)."""
    g2 = g * g
    sum_a = jnp.sum(a, axis=(1, 2), keepdims=True)
    alpha = jnp.where(g != 0, g2 / (2.0 * g2 + sum_a * g2 * g + eps), 0.0)
    weights = jnp.sum(alpha * jax.nn.relu(g), axis=(1, 2))
    return first_component(weights[:, None, None, :] * a)


def negated_eigen(base):
    terms = channel_terms(gcj.methods.formula(base))
    return lambda a, g: -first_component(terms(a, g))


def ours_extras(method, pair, x, t, keep):
    """Our agreement-only variants: ``[(peer, kind, fn)]``."""
    tap = pair.tap
    if method == "kpca_cam":
        return [
            ("ours", "sklearn_sign", lambda: np.asarray(gcj.cam(tap, x[:keep], t[:keep], kpca_sklearn_sign)))
        ]
    if method in ("grad_cam_eigen", "grad_cam_plus_plus_eigen"):
        base = _SMOOTHED[method][0]
        out = [("ours", "negated", lambda: np.asarray(gcj.cam(tap, x[:keep], t[:keep], negated_eigen(base))))]
        if method == "grad_cam_plus_plus_eigen":
            out.append(("ours", "eps", lambda: np.asarray(gcj.cam(tap, x[:keep], t[:keep], eigen_pp_eps))))
        return out
    return []


def is_family(method) -> bool:
    return method in FAMILY


def family_rows(method, r, ours, pgc, ex):
    """The agreement rows of a family method (``r``: agreement.Rows)."""
    if pgc is None:
        return
    if method == "kpca_cam":
        r.add(PGC, "defaults (component sign differs)", "kpca_sign", ours, pgc)
        if ("ours", "sklearn_sign") in ex:
            r.add(PGC, "matched: scikit-learn's sign", "kpca_matched", ex[("ours", "sklearn_sign")], pgc)
    elif method.endswith("_eigen"):
        r.add(PGC, "defaults (component sign differs)", "eigen_sign", ours, pgc)
        if ("ours", "negated") in ex:
            neg = ex[("ours", "negated")]
            better = [
                o if np.corrcoef(o.ravel(), p.ravel())[0, 1] >= np.corrcoef(n.ravel(), p.ravel())[0, 1] else n
                for o, n, p in zip(ours, neg, pgc, strict=True)
            ]
            r.add(PGC, "matched: sign per image", "eigen_matched", np.stack(better), pgc)
        if ("ours", "eps") in ex:
            r.add(PGC, "matched: sign, and its eps 1e-6", "eigen_eps", ex[("ours", "eps")], pgc)
    elif method == "dff":
        r.add(PGC, "same start, CD vs MU solver", "dff_solver", ours, matched_components(ours, pgc))
        if ("scikit-learn", "mu_same_start") in ex:
            mu = ex[("scikit-learn", "mu_same_start")]
            r.add("scikit-learn", "matched: NMF(solver='mu')", "dff_mu", ours, matched_components(ours, mu))
    else:
        note = {"shapley_cam": "shapley", "finer_cam": "finer", "fullgrad": "fullgrad"}.get(method)
        note = note or ("aug" if method.endswith("_aug") else "family_same")
        r.add(PGC, "defaults (same convention)", note, ours, pgc)
