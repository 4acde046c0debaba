"""Names every part of the peer comparison uses: methods, models, implementations, presets, targets."""

from __future__ import annotations

import importlib.metadata

import jax.numpy as jnp

METHODS = {
    "grad_cam": "Grad-CAM",
    "grad_cam_plus_plus": "Grad-CAM++",
    "guided_backprop": "Guided Backprop",
    "guided_grad_cam": "Guided Grad-CAM",
    "score_cam": "Score-CAM",
}
#: The rest of pytorch-grad-cam's CAM family (issue 15; benchmarks/peers/cam_family.py).
FAMILY = {
    "grad_cam_elementwise": "Grad-CAM element-wise",
    "shapley_cam": "ShapleyCAM (ReST target)",
    "finer_cam": "Finer-CAM",
    "kpca_cam": "KPCA-CAM",
    "fullgrad": "FullGrad",
    "grad_cam_aug": "Grad-CAM aug_smooth",
    "grad_cam_eigen": "Grad-CAM eigen_smooth",
    "grad_cam_plus_plus_aug": "Grad-CAM++ aug_smooth",
    "grad_cam_plus_plus_eigen": "Grad-CAM++ eigen_smooth",
    "dff": "Deep Feature Factorization (5 concepts)",
}
METHODS.update(FAMILY)
MODELS = {"resnet50": "ResNet-50", "efficientnet_lite0": "EfficientNet-Lite0"}
DTYPES = ("float32", "bfloat16")

OURS = "gradcam_jax"
PGC = "pytorch-grad-cam"
CAPTUM = "Captum"

# Presets: every value can be overridden by its flag.
PRESETS = {
    "quick": dict(
        batch=2,
        size=96,
        repeats=3,
        dtypes="float32",
        score_cam_batch=1,
        score_cam_size=96,
        score_cam_models="efficientnet_lite0",
        score_cam_chunk=16,
        agree_batch=2,
        threads=1,
    ),
    "default": dict(
        batch=8,
        size=224,
        repeats=5,
        dtypes="float32",
        score_cam_batch=1,
        score_cam_size=128,
        score_cam_models="efficientnet_lite0",
        score_cam_chunk=16,
        agree_batch=8,
        threads=0,
    ),
    "gpu": dict(
        batch=256,
        size=224,
        repeats=3,
        dtypes="float32,bfloat16",
        score_cam_batch=4,
        score_cam_size=224,
        score_cam_models="resnet50,efficientnet_lite0",
        score_cam_chunk=256,
        agree_batch=8,
        threads=0,
    ),
}

TARGETS = {  # from the issue; checked on a GPU at batch 256 (float32)
    ("grad_cam", PGC): 20.0,
    ("grad_cam", CAPTUM): 4.0,
    ("guided_grad_cam", CAPTUM): 2.5,
}
CORR_TARGET = 0.999
#: The issue-15 speed-up targets against pytorch-grad-cam: on a CPU at batch 8 (224 px).
FAMILY_TARGETS = {
    (m, "pytorch-grad-cam"): 3.0
    for m in (
        "fullgrad",
        "shapley_cam",
        "finer_cam",
        "grad_cam_aug",
        "grad_cam_eigen",
        "grad_cam_plus_plus_aug",
        "grad_cam_plus_plus_eigen",
    )
}


def version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def jax_dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def torch_dtype(torch, name: str):
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def cuda_live(torch) -> bool:
    """Whether torch has started using a GPU (then its calls need a synchronize to be timed)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def torch_sync(torch):
    """A ``sync(out) -> out`` that waits for torch's GPU work, if any."""

    def sync(out):
        if cuda_live(torch):
            torch.cuda.synchronize()
        return out

    return sync
