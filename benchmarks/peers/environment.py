"""What this run has: the peers that import, the devices, the versions, and torch's precision switch."""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import platform
import warnings

import jax

import gradcam_jax as gcj

from .common import CAPTUM, PGC, version

SETUP_HINT = """\
To measure the peers, create the benchmark environment once (a separate virtualenv outside the
repository; torch 2.14.1 + torchvision 0.29.1 + grad-cam + captum, about 5.5 GB, a CUDA build
that also runs on CPU):

    bash benchmarks/setup_peers.sh                 # BENCH_VENV=/path/to/venv to choose where
    <that venv>/bin/python -m benchmarks.compare_peers --quick
"""


class Peers:
    """What is importable: torch, torchvision, pytorch-grad-cam, Captum, the Lite0 reference."""

    def __init__(self, disabled: bool):
        self.errors = {}
        self.torch = self._try("torch", "torch")
        self.torchvision = self._try("torchvision", "torchvision") if self.torch else None
        self.pgc = self._try("pytorch-grad-cam", "pytorch_grad_cam") if self.torch else None
        self.captum = self._try("Captum", "captum.attr") if self.torch else None
        self.lite = (
            self._try("efficientnet-lite-pytorch", "efficientnet_lite_pytorch") if self.torch else None
        )
        if disabled:
            self.pgc = self.captum = None
            self.errors[PGC] = self.errors[CAPTUM] = "not used: --no-peers"

    def _try(self, label, module):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return importlib.import_module(module)
        except Exception as e:  # ImportError, or a broken install (missing cv2, ABI mismatch)
            self.errors[label] = f"{type(e).__name__}: {e}"
            return None

    def report(self) -> list[str]:
        rows = [
            ("torch", self.torch, version("torch")),
            ("torchvision", self.torchvision, version("torchvision")),
            (PGC, self.pgc, version("grad-cam")),
            (CAPTUM, self.captum, version("captum")),
            ("efficientnet-lite-pytorch", self.lite, version("efficientnet-lite-pytorch")),
        ]
        lines = []
        for label, mod, ver in rows:
            if mod is not None:
                lines.append(f"  found    {label} {ver or ''}".rstrip())
            else:
                why = self.errors.get(label, "torch not importable")
                lines.append(f"  missing  {label} ({why})")
        return lines


def host_cpu() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} x{len(names)}"
    except OSError:
        pass
    return cpu


def environment(args, peers: Peers, torch_device: str) -> dict:
    dev = jax.devices()[0]
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "jax_device": f"{dev.platform} / {dev.device_kind}",
        "torch_device": None,
        "host_cpu": host_cpu(),
        "load_average_start": loadavg(),
        "python": platform.python_version(),
        "versions": {
            name: version(dist)
            for name, dist in (
                ("gradcam_jax", "gradcam-jax"),
                ("jax", "jax"),
                ("jaxlib", "jaxlib"),
                ("flax", "flax"),
                ("numpy", "numpy"),
                ("torch", "torch"),
                ("torchvision", "torchvision"),
                ("grad-cam", "grad-cam"),
                ("captum", "captum"),
                ("efficientnet-lite-pytorch", "efficientnet-lite-pytorch"),
            )
        },
        "preset": args.preset,
        "settings": {
            k: getattr(args, k)
            for k in (
                "batch",
                "size",
                "repeats",
                "models",
                "methods",
                "dtypes",
                "score_cam_batch",
                "score_cam_size",
                "score_cam_models",
                "score_cam_chunk",
                "agree_batch",
                "threads",
                "seed",
            )
        },
    }
    if env["versions"]["gradcam_jax"] is None:
        env["versions"]["gradcam_jax"] = gcj.__version__
    if peers.torch is not None:
        torch = peers.torch
        env["torch_device"] = (
            f"cuda / {torch.cuda.get_device_name()}"
            if torch_device.startswith("cuda")
            else f"cpu ({torch.get_num_threads()} threads)"
        )
        try:
            import cv2

            env["versions"]["opencv"] = cv2.__version__
        except Exception:
            pass
    return env


def loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


@contextlib.contextmanager
def torch_precision(torch, on_gpu: bool, full_fp32: bool):
    """float32 on a GPU: TF32 off in torch, as ``highest`` precision is for ours."""
    if torch is None or not on_gpu or not full_fp32:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
