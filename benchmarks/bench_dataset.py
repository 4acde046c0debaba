"""End-to-end dataset throughput against compute-only throughput, for a zoo model.

    python -m benchmarks.bench_dataset --images 256 --batch-size 32 --size 224

Builds (or takes, ``--src``) a folder of JPEG photos of about ImageNet's size (500 x 375,
crops of the bundled demo picture), then measures, in one process, with the step compiled
beforehand:

  loader only    the Grain pipeline alone: decode + resize to ``--size``, in worker threads
  compute only   the same jitted, sharded step that explain_dataset runs (preprocess, one
                 forward/backward, Grad-CAM, softmax top-5) on one device-resident batch,
                 called back to back -- the ceiling for the end-to-end number
  end to end     explain_dataset on the folder into a fresh Zarr store: listing, loading,
                 compute, writing, commit markers, progress; wall time of the whole run

and prints images/s of each and the ratio end-to-end / compute-only. Compute-only is
measured before and after the end-to-end run (the median of all its timed calls is used), so
load from other processes on the machine hits both alike. Runs unchanged on CPU or GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from gradcam_jax import zoo
from gradcam_jax.dataset import explain_dataset, sources
from gradcam_jax.dataset.distributed import replicate
from gradcam_jax.dataset.run import describe_job
from gradcam_jax.dataset.step import build_step

from .harness import median, time_round_robin


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="images in the generated folder (default 256)")
    p.add_argument("--src", default=None, help="use this folder of images instead of generating one")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (default 32)")
    p.add_argument("--device-batch", type=int, default=None, help="images per model call per device")
    p.add_argument("--size", type=int, default=224, help="input side (default 224)")
    p.add_argument("--resolution", choices=("layer", "input"), default="layer")
    p.add_argument("--workers", type=int, default=None, help="loader threads (default: CPU count, <= 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed compute-only calls per round (default 5)")
    p.add_argument(
        "--weights",
        choices=("imagenet", "random"),
        default="imagenet",
        help="zoo weights (random if the weights package is missing)",
    )
    p.add_argument("--keep", action="store_true", help="keep the generated folder and store")
    return p.parse_args(argv)


def make_photos(root: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEGs of 500 x 375 (or 375 x 500): random crops of the demo picture, rescaled."""
    from PIL import Image

    r = np.random.default_rng(seed)
    base = Image.open(zoo.DEMO_IMAGE).convert("RGB")
    W, H = base.size
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cw, ch = int(W * r.uniform(0.5, 1.0)), int(H * r.uniform(0.5, 1.0))
        x0, y0 = int(r.integers(0, W - cw + 1)), int(r.integers(0, H - ch + 1))
        size = (500, 375) if i % 4 else (375, 500)
        im = base.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.BILINEAR)
        if i % 2:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        im.save(root / f"photo{i:05d}.jpg", quality=90)


def loader_only(src_dir: Path, size: int, batch: int, workers: int) -> float:
    src = sources.as_source(src_dir)
    steps = -(-len(src) // batch)
    load = sources.LoadRecord(src, sources.record_spec(src, size), sources.BlockRows(batch, batch, 0), None)
    it = iter(sources.make_loader(load, steps, workers=workers))
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        b = next(it)
        n += int((np.asarray(b["row"]) < len(src)).sum())
    return n / (time.perf_counter() - t0)


def store_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def photo_folder(args, work: Path) -> Path:
    if args.src:
        return Path(args.src)
    src_dir = work / "photos"
    t = time.perf_counter()
    make_photos(src_dir, args.images)
    print(f"# generated {args.images} JPEGs (500x375) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return src_dir


def run_options(args, workers: int) -> dict:
    """The options of every explain_dataset run here (and of describe_job: the same job)."""
    return dict(
        batch_size=args.batch_size,
        device_batch=args.device_batch,
        resolution=args.resolution,
        size=args.size,
        workers=workers,
        progress=False,
    )


def warm_up(args, model, src_dir: Path, work: Path, workers: int) -> float:
    """Compile once, through a small run (seconds): explain_dataset caches its step, and the
    compute-only measurement calls the very same compiled function."""
    warm_dir = work / "warm"
    warm_dir.mkdir()
    for f in sorted(src_dir.iterdir())[: args.batch_size]:
        shutil.copy(f, warm_dir / f.name)
    t = time.perf_counter()
    explain_dataset(warm_dir, model, out=work / "warm.zarr", **run_options(args, workers))
    return time.perf_counter() - t


def compute_only(args, model, src_dir: Path, work: Path, workers: int):
    """(a call of the cached step on one fixed, device-resident batch; micro-batch). describe_job
    gives the job explain_dataset runs (so the same step), without running it."""
    job = describe_job(src_dir, model, out=work / "run.zarr", **run_options(args, workers))
    step = build_step(job.step)
    rows = sources.BlockRows(args.batch_size, args.batch_size, 0)
    batch = sources.LoadRecord(job.source, job.record, rows, None)
    x_host = np.stack([batch(i)["x"] for i in range(args.batch_size)])
    x = jax.device_put(x_host, job.plan.sharding)
    tt = jax.device_put(np.zeros((args.batch_size,), np.int32), job.plan.sharding)
    tap = replicate(job.model.tap, job.plan.replicated)
    jax.block_until_ready(step(tap, x, tt))
    return (lambda: step(tap, x, tt)), job.plan.micro


def measure(args, model, src_dir: Path, work: Path, workers: int) -> dict:
    """Every figure: warm-up, compute only (before and after the end-to-end run), loader only, end to end."""
    compile_s = warm_up(args, model, src_dir, work, workers)
    call, micro = compute_only(args, model, src_dir, work, workers)
    times = time_round_robin([call], args.repeats)[0]
    loader_ips = loader_only(src_dir, args.size, args.batch_size, workers)
    hits_before = build_step.cache_info().hits
    out = work / "run.zarr"
    run = explain_dataset(src_dir, model, out=out, **run_options(args, workers))
    times += time_round_robin([call], args.repeats)[0]
    # The end-to-end run reused the compiled step (no compilation inside its timing).
    assert build_step.cache_info().hits > hits_before, "explain_dataset rebuilt its step"
    return dict(
        compile_s=compile_s, micro=micro, times=times, loader_ips=loader_ips, run=run, store_mb=store_mb(out)
    )


def report(args, model, workers: int, n_images: int, m: dict) -> None:
    run, times = m["run"], m["times"]
    e2e_ips = run.processed / run.seconds
    compute_ips = args.batch_size / median(times)
    dev = jax.devices()[0]
    print(
        f"# {platform.node()}  {dev.platform}:{dev.device_kind}  x{jax.device_count()}  "
        f"cpus={os.cpu_count()}  jax {jax.__version__}"
    )
    print(
        f"# model efficientnet_lite0 ({model.source or 'random'}), {args.size}px, batch {args.batch_size}, "
        f"device_batch {m['micro']}, grad_cam top class, maps at {args.resolution} resolution, "
        f"{workers} loader threads, {n_images} images"
    )
    print(f"{'warm-up run (compile)':28s} {m['compile_s']:8.1f} s")
    print(f"{'loader only':28s} {m['loader_ips']:8.1f} images/s")
    print(
        f"{'compute only (same step)':28s} {compute_ips:8.1f} images/s   "
        f"(median of {len(times)} calls, {1e3 * median(times):.0f} ms/batch)"
    )
    print(
        f"{'end to end (explain_dataset)':28s} {e2e_ips:8.1f} images/s   "
        f"({run.processed} images in {run.seconds:.1f} s, store {m['store_mb']:.2f} MB)"
    )
    print(f"{'ratio end-to-end / compute':28s} {e2e_ips / compute_ips:8.2f}")


def main(argv=None):
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_dataset_"))
    try:
        src_dir = photo_folder(args, work)
        try:
            model = zoo.efficientnet_lite0(None if args.weights == "random" else "imagenet")
        except ImportError:
            model = zoo.efficientnet_lite0(None)
        workers = min(os.cpu_count() or 1, 8) if args.workers is None else args.workers
        n_images = len(sources.list_images(src_dir))
        report(args, model, workers, n_images, measure(args, model, src_dir, work, workers))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"# kept {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
