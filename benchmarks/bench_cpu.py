"""bench_cpu: on a CPU, gradcam_jax before and after the CPU convolution rewrites, against the peers.

One table, measured in one run: for EfficientNet-Lite0 and ResNet-50 (the same weights on both
sides, from ``benchmarks/peers/models.py``), at each size and batch, the forward pass (ours jit,
torch eager) and every method (ours against pytorch-grad-cam and Captum), with ours twice:

* **before**: the models as they were, every convolution ``jax.lax.conv_general_dilated``
  (traced with ``gradcam_jax.models.*.conv_general_dilated`` swapped back for it);
  (``--before plain-taps``: the CPU rewrite with ``jax.grad``'s own transpose of the depthwise tap
  sum, as before ``depthwise_taps`` had its derivative rule; ``--before chained-relu6``: Guided
  Backprop's ReLU6 as the guided ReLU then ``min``, as before ``guided_clipped_relu``;
  ``--before none``: no such column);
(``--before device-loop``: Score-/Ablation-CAM compiled under ``jit`` with
``chunk_loop="device"``, every chunk in one ``lax.map``, while **after** calls them eagerly with
``chunk_loop="host"``: the chunks from Python over one jitted chunk kernel);
* **after**: the models as shipped, whose convolutions go through
  ``gradcam_jax.models._convs.conv_general_dilated`` (depthwise as a sum over taps, 3x3 on maps
  smaller than the kernel as im2col + matmul; CPU only).

Each round calls before, after, then each peer (the order reversed every other round), so load
from other processes hits them alike; the table gives medians and the paired ratio (median over
rounds of peer time / our time: above 1, ours is faster). ``--methods gradients`` (not in the
default grid) times plain input gradients against torch's ``autograd.grad``: what Captum's
Guided Backprop computes on ReLU6 networks (it only swaps ``nn.ReLU``). ``--sweep`` adds the
forward pass's time per pixel over input sizes (the small-map cliff). Run from the peers' venv
(``benchmarks/setup_peers.sh``)::

    /work/bench-venv/bin/python -m benchmarks.bench_cpu                      # the full grid
    /work/bench-venv/bin/python -m benchmarks.bench_cpu --models efficientnet_lite0 --sizes 96 --batches 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import gradcam_jax as gcj
from gradcam_jax import _rules
from gradcam_jax.models import _blocks, _convs, resnet
from gradcam_jax.models._depthwise import tap_sum

from .harness import table
from .peers.common import CAPTUM, PGC
from .peers.environment import Peers
from .peers.implementations import TorchBatch, compile_ours, ours_impl, pgc_cam, plain_gradient, torch_impls
from .peers.measure import Impl
from .peers.models import build_lite0, build_resnet50, make_images
from .peers.options import limit_xla_threads

MODELS = {"efficientnet_lite0": build_lite0, "resnet50": build_resnet50}
METHODS = ["forward", "grad_cam", "grad_cam_plus_plus", "guided_backprop", "guided_grad_cam"]
SLOW = ["score_cam", "ablation_cam"]
LABELS = {
    "forward": "forward",
    "grad_cam": "Grad-CAM",
    "grad_cam_plus_plus": "Grad-CAM++",
    "guided_backprop": "Guided Backprop",
    "guided_grad_cam": "Guided Grad-CAM",
    "score_cam": "Score-CAM (all channels)",
    "ablation_cam": "Ablation-CAM (all channels)",
    "gradients": "plain input gradient",
}


@contextlib.contextmanager
def plain_tap_sums():
    """Trace the models with depthwise convolutions as the plain tap sum, which ``jax.grad`` transposes
    itself (the CPU rewrite before ``depthwise_taps`` had its own derivative rule)."""
    saved = _convs.depthwise_taps
    _convs.depthwise_taps = lambda x, k, strides, padding: tap_sum(x, k, tuple(strides), padding)
    jax.clear_caches()
    try:
        yield
    finally:
        _convs.depthwise_taps = saved
        jax.clear_caches()


@contextlib.contextmanager
def before_rewrites():
    """Trace the models with plain ``lax.conv_general_dilated`` (the code before the rewrites).

    JAX's trace caches are cleared on entry and exit: the explainers' jitted kernels are cached
    by the model's static structure, which is the same before and after, so without this one
    side would reuse the other's trace.
    """
    saved = _blocks.conv_general_dilated, resnet.conv_general_dilated
    _blocks.conv_general_dilated = resnet.conv_general_dilated = lax.conv_general_dilated
    jax.clear_caches()
    try:
        yield
    finally:
        _blocks.conv_general_dilated, resnet.conv_general_dilated = saved
        jax.clear_caches()


@contextlib.contextmanager
def chained_relu6():
    """Trace Guided Backprop with each ReLU6 as the guided ReLU followed by ``min``'s own gradient,
    the mask rebuilt from the forward's inputs (before ``_rules.guided_clipped_relu``)."""
    saved = _rules.GUIDED.clipped
    _rules.GUIDED.clipped = None
    jax.clear_caches()
    try:
        yield
    finally:
        _rules.GUIDED.clipped = saved
        jax.clear_caches()


def before_context(kind: str):
    contexts = {"lax": before_rewrites, "plain-taps": plain_tap_sums, "chained-relu6": chained_relu6}
    return contexts[kind]()


def eager_ours(name, fn, args, precision="highest"):
    """``fn(*args)`` called as a user calls it, without an outer ``jit`` (the explainer's own
    kernels: on a CPU, its host chunk loop); compiled by one warm-up call, which ``compile_s``
    includes."""

    def call():
        with jax.default_matmul_precision(precision):
            return fn(*args)

    t = time.perf_counter()
    jax.block_until_ready(call())
    return Impl(name, call, sync=jax.block_until_ready, compile_s=time.perf_counter() - t)


SLOW_CALLS = {
    "score_cam": lambda tap, x, t, chunk, loop: gcj.score_cam(tap, x, t, chunk_size=chunk, chunk_loop=loop),
    "ablation_cam": lambda tap, x, t, chunk, loop: gcj.ablation_cam(
        tap, x, t, chunk_size=chunk, chunk_loop=loop
    ),
}


def ours(method, pair, x, t, chunk, loop=None):
    """Our compiled call of ``method`` (the current tracing context decides before/after).

    ``loop`` (Score-/Ablation-CAM only): ``"device"``, the call compiled under ``jit`` with
    ``chunk_loop="device"`` (one program, the chunks in a ``lax.map``); ``"host"``, the explainer
    called eagerly with ``chunk_loop="host"`` (the chunks from Python over one jitted chunk kernel).
    """
    if method in SLOW and loop is not None:
        f = SLOW_CALLS[method]
        if loop == "device":
            return compile_ours(
                method, lambda tap, x, t: f(tap, x, t, chunk, loop), (pair.tap, x, t), "highest"
            )
        return eager_ours(method, lambda tap, x, t: f(tap, x, t, chunk, loop), (pair.tap, x, t))
    if method == "forward":
        return compile_ours("forward", lambda v, x: pair.module.apply(v, x), (pair.variables, x), "highest")
    if method == "ablation_cam":
        return compile_ours(
            "ablation",
            lambda tap, x, t: gcj.ablation_cam(tap, x, t, chunk_size=chunk),
            (pair.tap, x, t),
            "highest",
        )
    if method == "gradients":  # not in the grid: the like-for-like row for Captum's Guided Backprop on ReLU6
        return compile_ours(
            "gradients",
            lambda v, x, t: gcj.gradients(lambda x: pair.module.apply(v, x), x, t),
            (pair.variables, x, t),
            "highest",
        )
    return ours_impl(method, pair, x, t, chunk, "highest")


def peer_calls(method, pair, xt, targets, chunk, peers):
    """``{name: Impl}`` of the peers' timed calls (torch eager for the forward pass)."""
    torch = peers.torch
    if torch is None or pair.torch_model is None:
        return {}
    if method == "forward":

        def forward():
            with torch.no_grad():
                return pair.torch_model(xt)

        return {"torch": Impl("torch", forward)}
    if method == "gradients":
        batch = TorchBatch(torch, pair, xt, targets, chunk, len(targets))
        return {"torch": Impl("torch", lambda: plain_gradient(batch))}
    if method == "ablation_cam":
        if peers.pgc is None:
            return {}
        from pytorch_grad_cam import AblationCAM

        return {PGC: pgc_cam(TorchBatch(torch, pair, xt, targets, chunk, 1), AblationCAM, batch_size=chunk)}
    return {impl.name: impl for impl in torch_impls(method, pair, xt, targets, chunk, peers, [], 1)}


def time_rounds(calls: dict, repeats: int, cpu: dict | None = None, settle: float = 0.0) -> dict:
    """Seconds per call of each ``run()``, ``repeats`` rounds, the order reversed every other round.

    ``cpu``: if given, filled with the process's CPU seconds per call (all threads; both
    frameworks run in this process), a second estimate that waiting for a core does not inflate.
    ``settle``: seconds of sleep before each call, so that the previous call's worker threads
    (torch's OpenMP team spins after a parallel region) are idle when the next one starts.
    """
    names = list(calls)
    times: dict = {n: [] for n in names}
    for n in names:
        if cpu is not None:
            cpu[n] = []
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            time.sleep(settle)
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(calls[n]())
            times[n].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu[n].append(time.process_time() - c0)
    return times


def measure(method, pair, x, xt, t, peers, args) -> dict:
    """One row: compile before and after, warm every call up, then time them in rounds."""
    chunk = args.chunk
    before = None
    loops = args.before == "device-loop"
    if loops:
        before = ours(method, pair, x, t, chunk, "device") if method in SLOW else None
    elif args.before != "none":
        with before_context(args.before):
            before = ours(method, pair, x, t, chunk)
    after = ours(method, pair, x, t, chunk, "host" if loops else None)
    targets = np.asarray(t)
    peer = peer_calls(method, pair, xt, targets, chunk, peers)
    for impl in peer.values():
        if impl.setup:
            impl.setup()
    calls = {**({"before": before.run} if before else {}), "after": after.run}
    calls.update({n: impl.run for n, impl in peer.items()})
    slow = method in SLOW
    try:
        for call in calls.values():  # warm-up (for slow methods: skipped, one timed call each)
            if not slow:
                jax.block_until_ready(call())
        cpu: dict = {}
        times = time_rounds(calls, args.slow_repeats if slow else args.repeats, cpu, args.settle)
    finally:
        for impl in peer.values():
            if impl.teardown:
                impl.teardown()
    return {"compile_s": [before.compile_s if before else None, after.compile_s], "times": times, "cpu": cpu}


def row_cells(model, size, batch, method, res):
    times = res["times"]
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    peers = [k for k in times if k not in ("before", "after")]
    best = min(peers, key=lambda k: med[k]) if peers else None

    def paired(k, key="times"):
        return statistics.median(p / a for p, a in zip(res[key][k], res[key]["after"], strict=True))

    return [
        model,
        size,
        batch,
        LABELS[method],
        f"{med['before']:.1f}" if "before" in med else "-",
        f"{med['after']:.1f}",
        f"{paired('before'):.2f}x" if "before" in med else "-",
        f"{med[PGC]:.1f}" if PGC in med else "-",
        f"{med[CAPTUM]:.1f}" if CAPTUM in med else (f"{med['torch']:.1f}" if "torch" in med else "-"),
        f"{paired(best):.2f}x ({best})" if best else "-",
        f"{paired(best, 'cpu'):.2f}x" if best else "-",
        "yes" if best and paired(best) >= 1.0 else ("no" if best else "-"),
    ]


HEAD = [
    "model",
    "px",
    "batch",
    "method",
    "ours before ms",
    "ours after ms",
    "after speed-up",
    "pgc ms",
    "Captum / torch ms",
    "ours vs faster peer",
    "same, CPU time",
    "ours >= peer",
]


def run_model(key, args, peers, results):
    pair = MODELS[key]("float32", peers, "cpu", args.seed)
    forward = jax.jit(pair.module.apply)
    grid = [(m, size, batch) for size in args.sizes for batch in args.batches for m in args.methods]
    if key in args.slow_models:
        grid += [(m, args.slow_size, args.slow_batch) for m in SLOW]
    for method, size, batch in grid:
        x32 = pair.preprocess(make_images(batch, size, args.seed))
        x = jax.device_put(jnp.asarray(x32))
        xt = None
        if peers.torch is not None:
            xt = peers.torch.from_numpy(np.ascontiguousarray(x32.transpose(0, 3, 1, 2)))
        t = jnp.asarray(np.asarray(forward(pair.variables, x)).argmax(-1).astype(np.int32))
        res = measure(method, pair, x, xt, t, peers, args)
        row = row_cells(pair.label, size, batch, method, res)
        results.append({"row": row, **res, "load": os.getloadavg()})
        print(" | ".join(map(str, row)), f"(load {os.getloadavg()[0]:.1f})", flush=True)


def sweep(args, peers):
    """Forward time per pixel over input sizes, before and after, relative to 224 px."""
    rows = []
    for key in args.models:
        pair = MODELS[key]("float32", peers, "cpu", args.seed)
        per_px = {}
        for size in args.sweep:
            x = jax.device_put(jnp.asarray(pair.preprocess(make_images(args.sweep_batch, size, args.seed))))
            calls = {}
            if args.before != "none":
                with before_context(args.before):
                    calls["before"] = ours("forward", pair, x, None, args.chunk).run
            calls["after"] = ours("forward", pair, x, None, args.chunk).run
            xt = None
            if peers.torch is not None:
                xt = peers.torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
            calls.update({k: impl.run for k, impl in peer_calls("forward", pair, xt, None, 1, peers).items()})
            for call in calls.values():
                call()
            times = time_rounds(calls, args.repeats, settle=args.settle)
            per_px[size] = {k: statistics.median(v) / (size * size) for k, v in times.items()}
        ref = per_px.get(224, per_px[max(per_px)])
        for size, v in per_px.items():
            row = [pair.label, size, args.sweep_batch]
            row += [f"{v[k] * 1e9:.0f}" for k in v]
            row += [f"{v[k] / ref[k]:.2f}" for k in v]
            rows.append(row)
            print(" | ".join(map(str, row)), flush=True)
    names = list(next(iter(per_px.values())))
    head = ["model", "px", "batch", *(f"{n} ns/px" for n in names), *(f"{n} / 224 px" for n in names)]
    return head, rows


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    names = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--models", type=names, default=["efficientnet_lite0", "resnet50"])
    p.add_argument("--sizes", type=ints, default=[96, 224])
    p.add_argument("--batches", type=ints, default=[1, 8])
    p.add_argument("--methods", type=names, default=METHODS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and PJRT_NPROC")
    p.add_argument("--chunk", type=int, default=64, help="Score-/Ablation-CAM chunk = pgc batch_size")
    p.add_argument(
        "--slow-models", type=names, default=["efficientnet_lite0"], help="Score-, Ablation-CAM; '' for none"
    )
    p.add_argument("--slow-size", type=int, default=96)
    p.add_argument("--slow-batch", type=int, default=2)
    p.add_argument("--sweep", type=ints, default=[], help="sizes for the per-pixel forward sweep")
    p.add_argument("--sweep-batch", type=int, default=1)
    p.add_argument("--settle", type=float, default=0.3, help="seconds of sleep before each timed call")
    p.add_argument(
        "--before",
        choices=["lax", "plain-taps", "none", "device-loop", "chained-relu6"],
        default="lax",
        help="what 'before' is: lax's convolutions (no CPU rewrite), the rewrite with the plain tap sum's "
        "transpose as its gradient (before depthwise_taps' own rule), no before column (saves time), or "
        "(device-loop) Score-/Ablation-CAM jitted with chunk_loop='device' against 'after' called eagerly "
        "with chunk_loop='host' (the chunks from Python), or (chained-relu6) Guided Backprop's "
        "ReLU6 as the guided ReLU then min, as before _rules.guided_clipped_relu",
    )
    p.add_argument("--slow-repeats", type=int, default=1, help="timed rounds of Score-/Ablation-CAM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", help="write the tables here")
    p.add_argument("--json", help="write every time here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    limit_xla_threads(args.threads)
    peers = Peers(disabled=False)
    if peers.torch is not None:
        peers.torch.set_num_threads(args.threads)
    print("\n".join(peers.report()))
    header = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}, {args.threads} threads per framework; "
        f"load average at start {' / '.join(f'{v:.1f}' for v in os.getloadavg())}; "
        f"command: {' '.join(['python -m benchmarks.bench_cpu', *sys.argv[1:]])}"
    )
    print(header)
    out = [header, ""]
    results: list = []
    if args.sweep:
        head, rows = sweep(args, peers)
        out.append(table(head, rows, markdown=True))
    else:
        print(" | ".join(HEAD))
        for key in args.models:
            run_model(key, args, peers, results)
        out.append(table(HEAD, [r["row"] for r in results], markdown=True))
    out.append(f"\nload average at the end: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("\n".join(out))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(out) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, default=str)


if __name__ == "__main__":
    main()
