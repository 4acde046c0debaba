"""The whole comparison: every model, dtype and method, written as it goes, then the report."""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_jax as gcj

from .agreement import agreement_rows
from .cam_family import ours_extras
from .common import METHODS, MODELS, OURS, PGC, jax_dtype, torch_dtype, torch_sync
from .environment import SETUP_HINT, Peers, environment, loadavg, torch_precision
from .implementations import compile_ours, grad_cam_pp_eps, ours_impl, torch_impls
from .measure import Impl, keep_first, measure_method
from .models import BUILDERS, make_images
from .options import limit_xla_threads, parse_args
from .report import fmt_ratio, render, report_from_json


def row(label, m, batch, compile_s, method=None):
    """One speed row of the results (what the JSON holds)."""
    med = statistics.median(m.times) if m.times else None
    return {
        "method": label,
        "method_key": method,
        "impl": m.name,
        "batch": batch,
        "img_per_s": batch / med if med else None,
        "ms_per_batch": med * 1e3 if med else None,
        "x_floor": m.x_floor,
        "ours_faster_by": m.ratio,
        "peak_mib": m.peak_bytes / 2**20 if m.peak_bytes == m.peak_bytes else None,
        "compile_s": compile_s,
        "min_ms": min(m.times) * 1e3 if m.times else None,
        "max_ms": max(m.times) * 1e3 if m.times else None,
        "n": len(m.times),
        "error": m.error,
    }


class ModelRun:
    """Every method on one model in one dtype; ``results`` is the dict that goes into the report."""

    def __init__(self, key, dtype, args, peers, torch_device, on_gpu, log):
        self.args, self.peers, self.torch_device, self.on_gpu, self.log = (
            args,
            peers,
            torch_device,
            on_gpu,
            log,
        )
        self.dtype = dtype
        self.pair = BUILDERS[key](dtype, peers, torch_device, args.seed)
        self.has_torch = self.pair.torch_model is not None
        self.precision = "highest" if dtype == "float32" else None
        self.results = {
            "model": key,
            "label": self.pair.label,
            "dtype": dtype,
            "notes": list(self.pair.notes),
            "rows": [],
            "agreement": [],
            "skipped": [],
        }
        self.fwd = jax.jit(self.pair.module.apply)
        # method -> our kept output, for cross-method checks (Guided Grad-CAM's recipe)
        self.ours_outputs = {}

    def inputs(self, batch, size):
        """(float32 NHWC, ours on device, torch NCHW or None) for ``batch`` crops of ``size``."""
        x32 = self.pair.preprocess(make_images(batch, size, self.args.seed))
        x = jax.device_put(jnp.asarray(x32, jax_dtype(self.dtype)))
        xt = None
        if self.has_torch:
            torch = self.peers.torch
            xt = torch.from_numpy(np.ascontiguousarray(x32.transpose(0, 3, 1, 2))).to(
                self.torch_device, torch_dtype(torch, self.dtype)
            )
        return x32, x, xt

    def top_classes(self, x):
        return np.asarray(self.fwd(self.pair.variables, x).astype(jnp.float32)).argmax(-1).astype(np.int32)

    def run(self):
        t0 = time.perf_counter()
        args = self.args
        _, self.x, self.xt = self.inputs(args.batch, args.size)
        # The floor: our jit-compiled forward pass (its logits also pick the explained classes).
        self.floor = compile_ours(
            f"{OURS} forward (jit)",
            lambda v, x: self.pair.module.apply(v, x),
            (self.pair.variables, self.x),
            self.precision,
        )
        self.t = jax.device_put(jnp.asarray(self.explained_classes()))
        self.measure_floor()
        for method in args.methods:
            self.measure(method)
        self.results["seconds"] = time.perf_counter() - t0
        return self.results

    def explained_classes(self):
        """One class per image for every implementation: our model's top class."""
        res, pair = self.results, self.pair
        logits = np.asarray(self.floor.call().astype(jnp.float32))
        targets = logits.argmax(-1).astype(np.int32)
        res["targets"] = targets[:16].tolist()
        if self.has_torch and self.dtype == "float32":
            with self.peers.torch.no_grad():
                ref = pair.torch_model(self.xt).float().cpu().numpy()
            res["logits_max_abs_diff"] = float(np.abs(ref - logits).max())
            res["logits_max_abs"] = float(np.abs(ref).max())
            self.log(
                f"  logits: max |torch - ours| = {res['logits_max_abs_diff']:.2e} "
                f"(max |logit| {res['logits_max_abs']:.2f}); same top class: "
                f"{int((ref.argmax(-1) == targets).sum())}/{len(targets)}"
            )
        return targets

    def measure_floor(self):
        """Our jit forward (and torch's eager one) in rounds: the floor of every x-floor figure."""
        floor, torch, args = self.floor, self.peers.torch, self.args
        floor_peers = []
        if self.has_torch:

            def torch_forward():
                with torch.no_grad():
                    return self.pair.torch_model(self.xt)

            floor_peers.append(
                Impl(
                    "torch forward (eager)",
                    torch_forward,
                    sync=torch_sync(torch),
                    to_numpy=lambda a: a.float().cpu().numpy(),
                    torch=torch,
                )
            )
        fm = measure_method(floor, floor_peers, args.repeats, self.on_gpu, slow=False, keep=1)
        floor_s = statistics.median(fm[floor.name].times)
        self.results["floor_s"] = floor_s
        fm[floor.name].x_floor = 1.0
        for p in floor_peers:
            fm[p.name].x_floor, fm[p.name].ratio = fm[p.name].ratio, None
        self.results["rows"].append(row("forward (floor)", fm[floor.name], args.batch, floor.compile_s))
        for p in floor_peers:
            self.results["rows"].append(row("forward (floor)", fm[p.name], args.batch, None))
        self.log(f"  forward floor: {args.batch / floor_s:.1f} img/s (compile {floor.compile_s:.1f} s)")

    def method_inputs(self, method):
        """(x, torch x, targets, batch, size) of one method: Score-CAM (one forward pass per channel)
        has its own, smaller batch and size."""
        args = self.args
        if method == "score_cam" and (args.score_cam_batch, args.score_cam_size) != (args.batch, args.size):
            _, mx, mxt = self.inputs(args.score_cam_batch, args.score_cam_size)
            mt = jax.device_put(jnp.asarray(self.top_classes(mx)))
            return mx, mxt, mt, args.score_cam_batch, args.score_cam_size
        return self.x, self.xt, self.t, args.batch, args.size

    def skip(self, method, why, log):
        self.results["skipped"].append((method, why))
        self.log(f"  {METHODS[method]}: {log}")

    def measure(self, method):
        args, res, key = self.args, self.results, self.results["model"]
        slow = method == "score_cam"
        if slow and key not in args.score_cam_models:
            return self.skip(
                method,
                f"not in --score-cam-models ({args.preset} preset): one forward pass per channel",
                "skipped (not in --score-cam-models)",
            )
        mx, mxt, mt, mbatch, msize = self.method_inputs(method)
        tm = time.perf_counter()
        try:
            ours = ours_impl(method, self.pair, mx, mt, args.score_cam_chunk, self.precision)
        except Exception as e:
            why = f"ours failed: {type(e).__name__}: {e}"
            return self.skip(method, why, why)
        keep = min(args.agree_batch, mbatch) if self.dtype == "float32" else 0
        extras = ours_extras(method, self.pair, mx, mt, keep) if keep else []
        impls = (
            torch_impls(
                method, self.pair, mxt, np.asarray(mt), args.score_cam_chunk, self.peers, extras, keep
            )
            if self.has_torch
            else []
        )
        ms = measure_method(
            ours, impls, args.repeats, self.on_gpu, slow, keep, floor=None if slow else self.floor
        )
        if method == "grad_cam_plus_plus" and keep and PGC in ms:
            extras.append(("ours", "eps", self.ours_with_eps(mx, mt, keep)))
        extra_out = self.run_extras(method, extras, keep) if keep and ms[OURS].error is None else []
        o = ms[OURS]
        if o.error:
            return self.skip(method, f"ours failed: {o.error}", f"ours failed: {o.error}")
        same_shape = (mbatch, msize) == (args.batch, args.size)
        label = METHODS[method] + ("" if same_shape else f" (batch {mbatch}, {msize} px)")
        res["rows"].append(row(label, o, mbatch, ours.compile_s, method=method))
        res["rows"] += [row(label, ms[impl.name], mbatch, None, method=method) for impl in impls]
        if keep:
            self.ours_outputs[method] = o.output if same_shape else None
            for peer, conv, note, stats in agreement_rows(
                method, self.pair, o.output, ms, extra_out, self.ours_outputs
            ):
                res["agreement"].append(
                    {
                        "method": method,
                        "peer": peer,
                        "conventions": conv,
                        "note": note,
                        "images": keep,
                        **stats,
                    }
                )
        peer_txt = ", ".join(
            f"{n} {'failed' if ms[n].error else f'takes {fmt_ratio(ms[n].ratio)} our time'}"
            for n in (i.name for i in impls)
        )
        self.log(
            f"  {METHODS[method]}: ours {mbatch / statistics.median(o.times):.2f} img/s"
            f"{'; ' + peer_txt if peer_txt else ''} ({time.perf_counter() - tm:.0f} s)"
        )

    def ours_with_eps(self, mx, mt, keep):
        """Our Grad-CAM++ with pytorch-grad-cam's epsilon (agreement evidence only)."""

        def run():
            fn = jax.jit(lambda tap, x, t: gcj.cam(tap, x, t, method=grad_cam_pp_eps))
            with jax.default_matmul_precision(self.precision or "default"):
                return np.asarray(fn(self.pair.tap, mx[:keep], mt[:keep]))

        return run

    def run_extras(self, method, extras, keep):
        """The agreement-only runs: ``(peer, kind, output)``, failures noted and left out."""
        out = []
        for peer, kind, fn in extras:
            try:
                out.append((peer, kind, keep_first(fn(), keep)))
            except Exception as e:
                self.results["notes"].append(f"{METHODS[method]} {peer} {kind}: {type(e).__name__}: {e}")
        return out


def setup(args):
    """Threads, warnings, the peers and the torch device; returns (peers, on_gpu, torch_device)."""
    limit_xla_threads(args.threads)  # before the first jax computation initialises the CPU backend
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
            print(
                "warning: jax runs on a GPU but torch on the CPU: the speed comparison is not like for like"
            )
        if args.threads:
            peers.torch.set_num_threads(args.threads)
    return peers, on_gpu, torch_device


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        report_from_json(args.from_json, args.markdown)
        return
    t_start = time.perf_counter()
    peers, on_gpu, torch_device = setup(args)
    env = environment(args, peers, torch_device)
    peers_lines = peers.report()
    print(f"compare_peers ({args.preset}): jax on {env['jax_device']}, torch on {env['torch_device']}")
    print("peers:")
    print("\n".join(peers_lines))
    if peers.pgc is None or peers.captum is None:
        print()
        print(SETUP_HINT)

    def log(s):
        print(s, flush=True)

    def write(results, final):
        # Written after every model too, so that a run cut short (a time limit) keeps what it measured.
        env["load_average_end"] = loadavg()
        env["wall_s"] = round(time.perf_counter() - t_start, 1)
        env["complete"] = final
        if args.markdown:
            text = render(env, results, on_gpu, peers_lines, markdown=True)
            text += (
                f"\n\nTotal wall time {env['wall_s']:.0f} s; load average at the end "
                f"{env['load_average_end']}.{'' if final else ' (INCOMPLETE: the run stopped early.)'}\n"
            )
            Path(args.markdown).write_text(text)
        if args.json:
            Path(args.json).write_text(
                json.dumps({"environment": env, "results": results}, indent=1, default=str)
            )

    results = []
    for key in args.models:
        for dtype in args.dtypes:
            log(f"{MODELS[key]} {dtype}:")
            # float32: full precision on both sides (ours compiles under "highest"; torch: TF32 off).
            with torch_precision(peers.torch, on_gpu, dtype == "float32"):
                results.append(ModelRun(key, dtype, args, peers, torch_device, on_gpu, log).run())
            write(results, final=False)
    write(results, final=True)
    print()
    print(render(env, results, on_gpu, peers_lines))
    print(f"\ntotal wall time {env['wall_s']:.0f} s; load average at the end {env['load_average_end']}")
