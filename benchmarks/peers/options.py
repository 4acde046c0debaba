"""The command line of ``python -m benchmarks.compare_peers``: flags, presets, and CPU threads."""

from __future__ import annotations

import argparse
import os

from .common import DTYPES, METHODS, MODELS, PRESETS

DESCRIPTION = "gradcam_jax side by side with its peers, pytorch-grad-cam and Captum: map agreement and speed."


def parse_args(argv=None):
    args = parser().parse_args(argv)
    preset = "quick" if args.quick else "gpu" if args.gpu else "default"
    args.preset = preset
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = split(args.models, MODELS, "--models")
    args.methods = split(args.methods, METHODS, "--methods")
    args.dtypes = split(args.dtypes, DTYPES, "--dtypes")
    args.score_cam_models = (
        [] if args.score_cam_models == "none" else split(args.score_cam_models, MODELS, "--score-cam-models")
    )
    if args.threads < 0:
        raise SystemExit("--threads must be 0 (framework defaults) or positive.")
    for key in (
        "batch",
        "size",
        "repeats",
        "score_cam_batch",
        "score_cam_size",
        "score_cam_chunk",
        "agree_batch",
    ):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be positive.")
    if args.size < 32 or args.score_cam_size < 32:
        raise SystemExit("--size and --score-cam-size must be at least 32 (ResNet-50 downsamples 32x).")
    return args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--quick",
        action="store_true",
        help="batch 2, 96 px, 3 repeats; Score-CAM on EfficientNet-Lite0 only (minutes on a 2-core CPU)",
    )
    g.add_argument(
        "--gpu",
        action="store_true",
        help="batch 256, 224 px, float32 and bfloat16, Score-CAM on both models at batch 4",
    )
    p.add_argument("--batch", type=int, help="images per batch")
    p.add_argument("--size", type=int, help="image side in pixels")
    p.add_argument("--repeats", type=int, help="timed rounds per method (median reported)")
    p.add_argument(
        "--models", default="resnet50,efficientnet_lite0", help=f"comma-separated, from {', '.join(MODELS)}"
    )
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--dtypes", help="comma-separated compute dtypes: float32, bfloat16")
    p.add_argument("--score-cam-batch", type=int, help="Score-CAM batch (it runs one forward per channel)")
    p.add_argument("--score-cam-size", type=int, help="Score-CAM image side")
    p.add_argument("--score-cam-models", help="models Score-CAM runs on (comma-separated; 'none' for none)")
    p.add_argument(
        "--score-cam-chunk",
        type=int,
        help="masked images per forward pass, ours (chunk_size) and pytorch-grad-cam (batch_size) "
        "alike; CPU presets: 16, pytorch-grad-cam's default; --gpu: 256",
    )
    p.add_argument(
        "--agree-batch", type=int, help="images compared for agreement (the first ones of the batch)"
    )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads for both frameworks (torch.set_num_threads; the size of XLA's intra-op "
        "thread pool); 0 = each framework's default. --quick uses 1: on a loaded shared CPU, "
        "torch's OpenMP barriers stall when a core is taken, which would skew the comparison",
    )
    p.add_argument(
        "--no-peers", action="store_true", help="measure gradcam_jax alone even if peers are importable"
    )
    p.add_argument(
        "--torch-device",
        help="torch device (default: cuda when jax runs on a GPU and torch sees one, else cpu)",
    )
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--markdown", help="write the tables as Markdown to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--from-json",
        nargs="+",
        metavar="FILE",
        help="measure nothing: print (and with --markdown write) the tables of earlier --json "
        "runs, e.g. the four files of benchmarks/gpu.sh as one report",
    )
    return p


def split(value: str, allowed, flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: unknown {bad or value!r}; choose from {', '.join(allowed)}.")
    return items


def limit_xla_threads(threads: int) -> None:
    """Give XLA's CPU backend ``threads`` intra-op threads; call before its first computation.

    XLA has no flag for the size of its intra-op thread pool: the PJRT CPU client sizes it from
    the ``PJRT_NPROC`` environment variable (default: the CPUs the process may use). With one
    thread, ``--xla_cpu_multi_thread_eigen=false`` also keeps Eigen's kernels single-threaded.
    Every XLA flag goes into ``XLA_FLAGS`` with its leading ``--``: a first word without one
    makes XLA read the whole variable as a file name, and an unknown flag makes it abort.
    """
    if not threads:
        return
    os.environ["PJRT_NPROC"] = str(threads)
    if threads == 1:
        flags = os.environ.get("XLA_FLAGS", "").split()
        os.environ["XLA_FLAGS"] = " ".join([*flags, "--xla_cpu_multi_thread_eigen=false"])
