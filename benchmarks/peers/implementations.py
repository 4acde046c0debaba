"""Every implementation of every method: ours (jit-compiled) and the peers' (pytorch-grad-cam, Captum).

Each is an :class:`~benchmarks.peers.measure.Impl` whose call is what gets timed. Besides the
timed ones, a method may add *extras*: untimed runs on the first images, only for the agreement
table (a peer with its defaults, a peer on the network with ReLU6 written as ReLU + clip, the
plain gradient, ...), as ``(peer, kind, function)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_jax as gcj
from gradcam_jax.perturbation import score_cam

from .cam_family import is_family, ours_family, pgc_family
from .common import CAPTUM, OURS, PGC, torch_sync
from .measure import Impl
from .models import Pair


def compile_ours(name, fn, args, precision):
    """AOT-compile ``fn(*args)`` (jit), under ``precision`` for float32 runs."""
    ctx = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    t = time.perf_counter()
    with ctx:
        compiled = jax.jit(fn).lower(*args).compile()
    return Impl(
        name,
        lambda: compiled(*args),
        sync=jax.block_until_ready,
        compiled=compiled,
        compile_s=time.perf_counter() - t,
    )


def ours_impl(method, pair: Pair, x, t, chunk, precision):
    module = pair.module
    if method == "grad_cam":
        return compile_ours(OURS, lambda tap, x, t: gcj.grad_cam(tap, x, t), (pair.tap, x, t), precision)
    if method == "grad_cam_plus_plus":
        return compile_ours(
            OURS,
            lambda tap, x, t: gcj.cam(tap, x, t, method="grad_cam_plus_plus"),
            (pair.tap, x, t),
            precision,
        )
    if method == "guided_backprop":
        return compile_ours(
            OURS,
            lambda v, x, t: gcj.guided_backprop(lambda x: module.apply(v, x), x, t),
            (pair.variables, x, t),
            precision,
        )
    if method == "guided_grad_cam":
        return compile_ours(
            OURS, lambda tap, x, t: gcj.guided_grad_cam(tap, x, t), (pair.tap, x, t), precision
        )
    if method == "score_cam":
        return compile_ours(
            OURS, lambda tap, x, t: score_cam(tap, x, t, chunk_size=chunk), (pair.tap, x, t), precision
        )
    if is_family(method):
        return ours_family(method, pair, x, t, compile_ours, precision)
    raise ValueError(method)


def grad_cam_pp_eps(a, g, eps=1e-6):
    """Grad-CAM++ as pytorch-grad-cam computes it: ``eps`` added to alpha's denominator.

    Only for the agreement table's evidence row (``gcj.cam`` accepts a method function).
    """
    g2 = g * g
    sum_a = jnp.sum(a, axis=(1, 2), keepdims=True)
    alpha = jnp.where(g != 0, g2 / (2.0 * g2 + sum_a * g2 * g + eps), 0.0)
    weights = jnp.sum(alpha * jax.nn.relu(g), axis=(1, 2))
    return jnp.einsum("bc,bhwc->bhw", weights, a, precision=jax.lax.Precision.HIGHEST)


# --------------------------------------------------------------------------------------------
# The peers (torch)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TorchBatch:
    """One batch on the torch side: ``x`` and ``targets`` (timed runs), their first ``n_extra``
    images ``xe`` / ``te`` (agreement-only runs), targets as tensors ``tt`` / ``tte``."""

    torch: Any
    pair: Pair
    x: Any
    targets: np.ndarray
    chunk: int
    n_extra: int

    def __post_init__(self):
        self.tt = self.torch.as_tensor(np.array(self.targets, dtype=np.int64), device=self.x.device)
        self.n_extra = max(1, self.n_extra)
        n = self.n_extra
        self.xe, self.te, self.tte = self.x[:n], self.targets[:n], self.tt[:n]
        self.size = tuple(self.x.shape[-2:])
        self.sync = torch_sync(self.torch)


def nchw_to_nhwc(a):
    return a.detach().float().permute(0, 2, 3, 1).cpu().numpy()


def maps_np(a):
    return a.detach().float().cpu().numpy()


def minmax(torch, a):
    """Per map, like ours and pytorch-grad-cam."""
    lo = a.amin(dim=(-2, -1), keepdim=True)
    hi = a.amax(dim=(-2, -1), keepdim=True)
    scaled = (a - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return torch.where(hi > lo, scaled, torch.zeros_like(a))


def torch_impls(method, pair, xt, targets, chunk, peers, extra, n_extra):
    """The peers' implementations of ``method`` (timed); agreement-only runs on the first
    ``n_extra`` images go to ``extra``."""
    b = TorchBatch(peers.torch, pair, xt, targets, chunk, n_extra)
    impls = []
    if peers.pgc is not None:
        impls += pgc_impls(method, b, extra)
    if peers.captum is not None:
        impls += captum_impls(method, b, extra)
    if method == "guided_backprop" and pair.torch_matched is not None:
        extra.append(("torch", "plain_gradient", lambda: plain_gradient(b)))
    return impls


def plain_gradient(b: TorchBatch):
    xp = b.xe.detach().clone().requires_grad_(True)
    out = b.pair.torch_model(xp)
    (grad,) = b.torch.autograd.grad(out.gather(1, b.tte[:, None]).sum(), xp)
    return nchw_to_nhwc(grad)


# --------------------------------------------------------------------------------------------
# pytorch-grad-cam


def pgc_targets(classes):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(int(c)) for c in classes]


def pgc_cam(b: TorchBatch, cls, **attrs):
    """A pytorch-grad-cam CAM class on the batch, built in ``setup`` and released in ``teardown``."""
    holder = {}
    targets = pgc_targets(b.targets)

    def setup():
        holder["cam"] = cls(model=b.pair.torch_model, target_layers=b.pair.torch_layers_pgc)
        for k, v in attrs.items():
            setattr(holder["cam"], k, v)

    def teardown():
        holder.pop("cam").activations_and_grads.release()

    return Impl(
        PGC,
        lambda: holder["cam"](input_tensor=b.x, targets=targets),
        setup=setup,
        teardown=teardown,
        torch=b.torch,
    )


def pgc_guided(net, x, classes):
    """pytorch-grad-cam's guided backprop, one image per call: it explains output[0] only."""
    from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel

    gb = GuidedBackpropReLUModel(net)

    def run():
        return np.stack(
            [gb(x[i : i + 1].detach().clone(), target_category=int(c)) for i, c in enumerate(classes)]
        )

    return run


def pgc_guided_grad_cam(b: TorchBatch, extra):
    """pytorch-grad-cam's recipe (its cam.py): normalised Grad-CAM map x guided backprop."""
    from pytorch_grad_cam import GradCAM

    pair, holder = b.pair, {}
    gb_run = pgc_guided(pair.torch_model, b.x, b.targets)
    targets = pgc_targets(b.targets)

    def setup():
        holder["cam"] = GradCAM(model=pair.torch_model, target_layers=pair.torch_layers_pgc)

    def teardown():
        holder.pop("cam").activations_and_grads.release()

    def run():
        cams = holder["cam"](input_tensor=b.x, targets=targets)
        return cams[..., None] * gb_run()

    if pair.torch_matched is not None:
        matched_gb = pgc_guided(pair.torch_matched, b.xe, b.te)
        targets_e = targets[: b.n_extra]

        def run_matched():
            with GradCAM(model=pair.torch_matched, target_layers=[pair.torch_matched_layer]) as cam:
                cams = cam(input_tensor=b.xe, targets=targets_e)
            return cams[..., None] * matched_gb()

        extra.append((PGC, "matched", run_matched))
    return Impl(PGC, run, setup=setup, teardown=teardown, torch=b.torch)


def pgc_score_cam_half_pixel(b: TorchBatch):
    """pytorch-grad-cam's ScoreCAM with its mask upsampler made half-pixel bilinear (agreement only)."""
    from unittest import mock

    from pytorch_grad_cam import ScoreCAM

    torch = b.torch

    class HalfPixelBilinear(torch.nn.Module):
        def __init__(self, size):
            super().__init__()
            self.size = size

        def forward(self, a):
            return torch.nn.functional.interpolate(a, size=self.size, mode="bilinear", align_corners=False)

    def run():
        with mock.patch.object(torch.nn, "UpsamplingBilinear2d", HalfPixelBilinear):
            cam = ScoreCAM(model=b.pair.torch_model, target_layers=b.pair.torch_layers_pgc)
            cam.batch_size = b.chunk
            try:
                return cam(input_tensor=b.xe, targets=pgc_targets(b.te))
            finally:
                cam.activations_and_grads.release()

    return run


def pgc_impls(method, b: TorchBatch, extra):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM

    pair = b.pair
    if method == "grad_cam":
        return [pgc_cam(b, GradCAM)]
    if method == "grad_cam_plus_plus":
        return [pgc_cam(b, GradCAMPlusPlus)]
    if method == "guided_backprop":
        timed = Impl(PGC, pgc_guided(pair.torch_model, b.x, b.targets), torch=b.torch)
        if pair.torch_matched is not None:
            extra.append((PGC, "matched", pgc_guided(pair.torch_matched, b.xe, b.te)))
        return [timed]
    if method == "guided_grad_cam":
        return [pgc_guided_grad_cam(b, extra)]
    if method == "score_cam":
        timed = pgc_cam(b, ScoreCAM, batch_size=b.chunk)
        extra.append((PGC, "half_pixel_masks", pgc_score_cam_half_pixel(b)))
        return [timed]
    if is_family(method):
        return pgc_family(method, b, extra)
    return []


# --------------------------------------------------------------------------------------------
# Captum


def captum_impls(method, b: TorchBatch, extra):
    from captum.attr import GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam

    pair, torch = b.pair, b.torch
    model, layer = pair.torch_model, pair.torch_layer
    xg = b.x.detach().clone().requires_grad_(True)
    xge = b.xe.detach().clone().requires_grad_(True)
    tt, tte = b.tt, b.tte
    if method == "grad_cam":
        lgc = LayerGradCam(model, layer)

        def run():  # the pipeline that gives ours' maps: ReLU, bilinear to the image, min-max
            a = lgc.attribute(xg, target=tt, relu_attributions=True)
            return minmax(torch, LayerAttribution.interpolate(a, b.size, "bilinear")[:, 0])

        def run_defaults():  # LayerGradCam's defaults: no ReLU; LayerAttribution.interpolate's: nearest
            a = lgc.attribute(xge, target=tte)
            return maps_np(LayerAttribution.interpolate(a, b.size)[:, 0])

        extra.append((CAPTUM, "defaults", run_defaults))
        return [Impl(CAPTUM, run, sync=b.sync, to_numpy=maps_np, torch=torch)]
    if method == "guided_backprop":
        gbp = GuidedBackprop(model)
        if pair.torch_matched is not None:
            gbm = GuidedBackprop(pair.torch_matched)
            extra.append((CAPTUM, "matched", lambda: nchw_to_nhwc(gbm.attribute(xge, target=tte))))
        return [
            Impl(
                CAPTUM, lambda: gbp.attribute(xg, target=tt), sync=b.sync, to_numpy=nchw_to_nhwc, torch=torch
            )
        ]
    if method == "guided_grad_cam":
        ggc = GuidedGradCam(model, layer)
        extra.append((CAPTUM, "defaults", lambda: nchw_to_nhwc(ggc.attribute(xge, target=tte))))
        if pair.torch_matched is not None:
            ggm = GuidedGradCam(pair.torch_matched, pair.torch_matched_layer)
            extra.append(
                (
                    CAPTUM,
                    "matched",
                    lambda: nchw_to_nhwc(ggm.attribute(xge, target=tte, interpolate_mode="bilinear")),
                )
            )
        return [
            Impl(
                CAPTUM,
                lambda: ggc.attribute(xg, target=tt, interpolate_mode="bilinear"),
                sync=b.sync,
                to_numpy=nchw_to_nhwc,
                torch=torch,
            )
        ]
    return []
