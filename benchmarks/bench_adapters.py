"""What the framework adapters cost: Grad-CAM through each adapter against a hand-written one.

    python -m benchmarks.bench_adapters --size 64 --batch 4 --repeats 7
    python -m benchmarks.bench_adapters --frameworks linen,haiku --repeats 15

For each framework, one small but real model of that framework with random weights, tapped at
one layer, and three jit-compiled rows timed interleaved (one call of each per round, the
order reversed every other round, the median of the rounds; compilation and one warm-up call
excluded):

  forward   the model's plain forward pass                                     -- the floor
  hand      Grad-CAM written out for that model without gradcam_jax: the model split at the
            layer with the framework's own means, jax.vjp with respect to the activation,
            the gradient's spatial mean, the weighted sum over channels
  adapter   gcj.grad_cam(tap, x, target=3, upsample=False, normalize=False, relu=False) with
            the framework's adapter (linen_tap, nnx_tap, equinox_tap, haiku_tap, keras_tap,
            hf_tap)

In every row the weights are arguments of the jitted function (the tap is a pytree), not
constants closed over. adapter / hand is given three ways: the ratio of the wall-time medians,
the paired ratio (the median over rounds of the two calls' ratio in the same round) and the
ratio of the median process CPU times per call (steadier on a shared machine: waiting for a
core does not count); XLA's FLOP ratio says how much work the adapter's program adds. The two
Grad-CAM rows must agree (max |diff| <= 1e-4; the exit status is 1 when they do not); the
target is adapter / hand <= 1.05 (issue 12), printed as PASS (most of the three ratios within
it) or FAIL per row, for information only: the exit status does not depend on timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_jax as gcj

from .harness import compile_and_warm, median, paired_ratio, table, time_round_robin, xla_gflop

FRAMEWORKS = ("linen", "nnx", "equinox", "haiku", "keras", "hf")
TARGET_CLASS = 3
NUM_CLASSES = 10
RATIO_TARGET = 1.05
AGREE_TOL = 1e-4


@dataclasses.dataclass
class Case:
    """One framework's model, tapped at one layer, with its three rows.

    ``forward(params, x) -> scores``, ``hand(params, x) -> raw maps`` and
    ``adapter(tap, x) -> raw maps`` are jitted; the maps are ``(B, h, w)``.
    """

    framework: str
    model: str
    layer: str
    params: Any
    tap: Any
    x: jax.Array
    forward: Callable
    hand: Callable
    adapter: Callable


class Skipped(Exception):
    """A framework that cannot be measured here (not installed, no adapter yet)."""


# --------------------------------------------------------------------------------------------
# The hand-written Grad-CAM, shared by every framework
# --------------------------------------------------------------------------------------------


def one_hot_scores(scores):
    """The cotangent that picks ``scores[:, TARGET_CLASS]`` for every example."""
    return jnp.zeros_like(scores).at[:, TARGET_CLASS].set(1)


def cam_from_pullback(pull, scores, a, channel_axis: int = -1):
    """``sum_k mean_space(d y / d A^k) A^k`` from ``jax.vjp``'s pullback with respect to ``A``."""
    (g,) = pull(one_hot_scores(scores))
    channel_axis %= a.ndim
    space = tuple(i for i in range(1, a.ndim) if i != channel_axis)
    weights = jnp.mean(g, axis=space, keepdims=True)
    return jnp.sum(weights * a, axis=channel_axis)


def cam_split(features, head, x, channel_axis: int = -1):
    """Grad-CAM of ``head(features(x))`` at the split: the vjp of the head at ``A = features(x)``."""
    a = features(x)
    scores, pull = jax.vjp(head, a)
    return cam_from_pullback(pull, scores, a, channel_axis)


def cam_delta(run, a_shape, channel_axis: int = -1):
    """Grad-CAM of a model run with ``delta`` added to the layer's output.

    ``run(delta) -> (scores, A)`` where the layers above see ``A + delta``; the vjp with respect
    to ``delta`` at zero is the gradient with respect to ``A``.
    """
    scores, pull, a = jax.vjp(run, jnp.zeros(a_shape.shape, a_shape.dtype), has_aux=True)
    return cam_from_pullback(pull, scores, a, channel_axis)


def adapter_row(**kwargs):
    """Row A: the library's Grad-CAM through a tap, the raw map at the layer's resolution."""
    return jax.jit(
        lambda tap, x: gcj.grad_cam(
            tap, x, target=TARGET_CLASS, upsample=False, normalize=False, relu=False, **kwargs
        )
    )


def linen_delta_run(module, variables, x, path: tuple[str, ...], **apply_kwargs):
    """``run(delta)`` for :func:`cam_delta` on a Linen module, with ``nn.intercept_methods``."""
    import flax.linen as nn

    def run(delta):
        seen = []

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and tuple(context.module.path) == path:
                seen.append(out)
                out = out + delta
            return out

        with nn.intercept_methods(interceptor):
            scores = module.apply(variables, x, **apply_kwargs)
        return scores, seen[0]

    return run


def activation_shape(run):
    """The tapped activation's shape and dtype, from an abstract run with a scalar delta."""
    return jax.eval_shape(lambda: run(jnp.zeros((), jnp.float32))[1])


def images(size: int, batch: int, seed: int, channels_first: bool = False):
    x = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)
    return jnp.transpose(x, (0, 3, 1, 2)) if channels_first else x


# --------------------------------------------------------------------------------------------
# One model per framework
# --------------------------------------------------------------------------------------------


def linen_case(args) -> Case:
    """The package's Flax Linen ResNet-18, tapped at ``stage4``."""
    from gradcam_jax import models

    model = models.resnet18(num_classes=NUM_CLASSES)
    variables = models.init_resnet(model, jax.random.key(args.seed), image_size=args.size)
    x = images(args.size, args.batch, args.seed + 1)
    layer = "stage4"

    def hand(v, x):
        run = linen_delta_run(model, v, x, (layer,), train=False)
        return cam_delta(run, activation_shape(run))

    return Case(
        "linen",
        "gradcam_jax.models.resnet18",
        layer,
        variables,
        gcj.linen_tap(model, variables, layer),
        x,
        jax.jit(lambda v, x: model.apply(v, x, train=False)),
        jax.jit(hand),
        adapter_row(),
    )


def nnx_case(args) -> Case:
    """A small Flax NNX CNN (three strided convolutions, pooling, a linear head), tapped at ``conv3``."""
    from flax import nnx

    class SmallCNN(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(3, 32, (3, 3), strides=2, rngs=rngs)
            self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
            self.conv3 = nnx.Conv(64, 128, (3, 3), strides=2, rngs=rngs)
            self.head = nnx.Linear(128, NUM_CLASSES, rngs=rngs)

        def features(self, x):
            return self.conv3(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))))

        def classify(self, a):
            return self.head(jnp.mean(nnx.relu(a), axis=(1, 2)))

        def __call__(self, x):
            return self.classify(self.features(x))

    model = SmallCNN(nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)
    x = images(args.size, args.batch, args.seed + 1)

    def hand(state, x):
        m = nnx.merge(graphdef, state)
        return cam_split(m.features, m.classify, x)

    return Case(
        "nnx",
        "SmallCNN (nnx.Conv x3 + Linear)",
        "conv3",
        state,
        gcj.nnx_tap(model, "conv3"),
        x,
        jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)),
        jax.jit(hand),
        adapter_row(),
    )


def equinox_case(args) -> Case:
    """A small Equinox CNN, channels-first and per example as Equinox's layers are, tapped at ``conv3``."""
    import equinox as eqx

    class SmallCNN(eqx.Module):
        conv1: eqx.nn.Conv2d
        conv2: eqx.nn.Conv2d
        conv3: eqx.nn.Conv2d
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3, k4 = jax.random.split(key, 4)
            self.conv1 = eqx.nn.Conv2d(3, 32, 3, stride=2, padding=1, key=k1)
            self.conv2 = eqx.nn.Conv2d(32, 64, 3, stride=2, padding=1, key=k2)
            self.conv3 = eqx.nn.Conv2d(64, 128, 3, stride=2, padding=1, key=k3)
            self.head = eqx.nn.Linear(128, NUM_CLASSES, key=k4)

        def features(self, x):  # (C, H, W) -> (C', h, w)
            return self.conv3(jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x)))))

        def classify(self, a):
            return self.head(jnp.mean(jax.nn.relu(a), axis=(1, 2)))

        def __call__(self, x):
            return self.classify(self.features(x))

    model = SmallCNN(jax.random.key(args.seed))
    arrays, static = eqx.partition(model, eqx.is_array)
    x = images(args.size, args.batch, args.seed + 1)  # (B, H, W, C): the tap transposes it

    def hand(arrays, x):
        m = eqx.combine(arrays, static)
        nchw = jnp.transpose(x, (0, 3, 1, 2))
        return cam_split(jax.vmap(m.features), jax.vmap(m.classify), nchw, channel_axis=1)

    def forward(arrays, x):
        return jax.vmap(eqx.combine(arrays, static))(jnp.transpose(x, (0, 3, 1, 2)))

    return Case(
        "equinox",
        "SmallCNN (eqx.nn.Conv2d x3 + Linear)",
        "conv3",
        arrays,
        gcj.equinox_tap(model, lambda m: m.conv3, channels_first=True),
        x,
        jax.jit(forward),
        jax.jit(hand),
        adapter_row(),
    )


def haiku_case(args) -> Case:
    """``hk.nets.ResNet18`` (``transform_with_state``, a random non-zero head), at the last block group."""
    import haiku as hk

    def net(x, is_training=False):
        # Haiku's ResNet zero-initialises the head, which would make every gradient zero.
        resnet = hk.nets.ResNet18(NUM_CLASSES, logits_config={"w_init": hk.initializers.VarianceScaling()})
        return resnet(x, is_training=is_training)

    transformed = hk.transform_with_state(net)
    x = images(args.size, args.batch, args.seed + 1)
    # Initialised in training mode: that is what creates the batch-norm moving averages.
    params, state = transformed.init(jax.random.key(args.seed), x[:1], is_training=True)
    layer = "res_net18/~/block_group_3"

    def run_with_delta(params, state, x, delta):
        seen = []

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.module_name == layer:
                seen.append(out)
                out = out + delta
            return out

        with hk.intercept_methods(interceptor):
            scores, _ = transformed.apply(params, state, None, x, is_training=False)
        return scores, seen[0]

    def hand(ps, x):
        run = functools.partial(run_with_delta, *ps, x)
        return cam_delta(run, activation_shape(run))

    return Case(
        "haiku",
        "hk.nets.ResNet18",
        layer,
        (params, state),
        gcj.haiku_tap(transformed, params, layer, state=state, is_training=False),
        x,
        jax.jit(lambda ps, x: transformed.apply(*ps, None, x, is_training=False)[0]),
        jax.jit(hand),
        adapter_row(),
    )


def keras_case(args) -> Case:
    """``keras.applications.MobileNetV2(weights=None)`` with 10 classes (logits), tapped at ``out_relu``."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        raise Skipped(f"Keras runs on the {keras.backend.backend()!r} backend; set KERAS_BACKEND=jax")
    keras.utils.set_random_seed(args.seed)
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(args.size, args.size, 3), classes=NUM_CLASSES, classifier_activation=None
    )
    # Random convolutions shrink MobileNetV2's activations block by block (to ~1e-12 at the last
    # layer) when batch norm runs on its initial statistics (mean 0, variance 1); set each batch
    # norm's statistics to those of a random batch instead, so the maps are of order one.
    for lay in model.layers:
        if isinstance(lay, keras.layers.BatchNormalization):
            lay.momentum = 0.0
    model(images(args.size, 8, args.seed + 2), training=True)
    layer = "out_relu"
    # The hand-written split: a sub-model pair sharing the model's layers (and variables).
    cut = [lay.name for lay in model.layers].index(layer)
    features = keras.Model(model.inputs, model.get_layer(layer).output)
    a_in = keras.Input(tuple(features.output.shape[1:]))
    h = a_in
    for lay in model.layers[cut + 1 :]:  # global average pooling, the dense head
        h = lay(h)
    head = keras.Model(a_in, h)
    x = images(args.size, args.batch, args.seed + 1)

    def values(m):
        return [v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables]

    def stateless(m, vs, x):
        return m.stateless_call(*vs, x, training=False)[0]

    def hand(vs, x):
        fv, hv = vs
        return cam_split(
            functools.partial(stateless, features, fv), functools.partial(stateless, head, hv), x
        )

    return Case(
        "keras",
        "keras.applications.MobileNetV2",
        layer,
        {"model": values(model), "split": (values(features), values(head))},
        gcj.keras_tap(model, layer),
        x,
        jax.jit(lambda vs, x: stateless(model, vs["model"], x)),
        jax.jit(lambda vs, x: hand(vs["split"], x)),
        adapter_row(),
    )


def hf_case(args) -> Case:
    """``transformers.FlaxResNetForImageClassification`` (a small ``ResNetConfig``), at the last stage.

    Its input is Hugging Face's ``pixel_values``, channels-first; the adapter row passes
    ``layout="NCHW"`` and the hand-written row transposes as the model's own ``__call__`` does.
    """
    if not hasattr(gcj, "hf_tap"):
        raise Skipped("gradcam_jax has no hf_tap yet")
    from transformers import FlaxResNetForImageClassification, ResNetConfig

    config = ResNetConfig(
        embedding_size=32,
        hidden_sizes=[32, 64, 128, 256],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        num_labels=NUM_CLASSES,
    )
    model = FlaxResNetForImageClassification(config, input_shape=(1, args.size, args.size, 3), seed=args.seed)
    variables = model.params  # {"params": ..., "batch_stats": ...}
    layer = "resnet/encoder/stages/3"
    x = images(args.size, args.batch, args.seed + 1, channels_first=True)

    def hand(v, x):
        nhwc = jnp.transpose(x, (0, 2, 3, 1))
        run = linen_delta_run(model.module, v, nhwc, tuple(layer.split("/")), deterministic=True)
        run_logits = lambda delta: (lambda out: (out[0].logits, out[1]))(run(delta))
        return cam_delta(run_logits, activation_shape(run_logits))

    return Case(
        "hf",
        "FlaxResNetForImageClassification",
        layer,
        variables,
        gcj.hf_tap(model, layer),
        x,
        jax.jit(lambda v, x: model(x, params=v, train=False).logits),
        jax.jit(hand),
        adapter_row(layout="NCHW"),
    )


BUILDERS = {
    "linen": linen_case,
    "nnx": nnx_case,
    "equinox": equinox_case,
    "haiku": haiku_case,
    "keras": keras_case,
    "hf": hf_case,
}


# --------------------------------------------------------------------------------------------
# Measure and report
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    case: Case
    times: dict[str, list[float]]  # "forward", "hand", "adapter" -> wall seconds per round
    cpu_times: dict[str, list[float]]  # the same rows -> process CPU seconds of every call
    gflop: dict[str, float]
    compile_s: dict[str, float]
    max_diff: float
    max_abs: float


class CpuTimed:
    """A call that also records the process CPU time of each of its calls (all threads, until
    the result is ready). On a shared machine, time spent waiting for a core while another
    process runs counts in wall time but not here, so its ratios are steadier; it still moves
    with cache and memory-bandwidth contention."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.times: list[float] = []

    def __call__(self):
        t0 = time.process_time()
        out = jax.block_until_ready(self.fn())
        self.times.append(time.process_time() - t0)
        return out


def measure(case: Case, args) -> Result:
    rows = {
        "forward": (case.forward, (case.params, case.x)),
        "hand": (case.hand, (case.params, case.x)),
        "adapter": (case.adapter, (case.tap, case.x)),
    }
    compiled = {name: compile_and_warm(fn, fn_args) for name, (fn, fn_args) in rows.items()}
    hand_map = np.asarray(compiled["hand"][0](case.params, case.x))
    adapter_map = np.asarray(compiled["adapter"][0](case.tap, case.x))
    if hand_map.shape != adapter_map.shape:
        raise AssertionError(
            f"{case.framework}: map shapes differ: hand {hand_map.shape}, adapter {adapter_map.shape}"
        )
    max_diff = float(np.max(np.abs(hand_map - adapter_map)))
    calls = {name: CpuTimed(functools.partial(compiled[name][0], *rows[name][1])) for name in rows}
    times: dict[str, list[float]] = {name: [] for name in rows}
    for i in range(args.repeats):
        # One harness round at a time, the order reversed every other round, so that no row
        # always runs right after another (caches, a neighbour's burst).
        order = list(rows) if i % 2 == 0 else list(rows)[::-1]
        for name, t in zip(
            order, time_round_robin([calls[n] for n in order], 1, min_seconds=args.min_seconds), strict=True
        ):
            times[name] += t
    return Result(
        case,
        times,
        {name: call.times for name, call in calls.items()},
        {name: xla_gflop(c) for name, (c, _) in compiled.items()},
        {name: s for name, (_, s) in compiled.items()},
        max_diff,
        float(np.max(np.abs(hand_map))),
    )


def verdict(*ratios: float) -> str:
    """PASS when most of the estimates of adapter / hand are within the target."""
    return "PASS" if 2 * sum(r <= RATIO_TARGET for r in ratios) > len(ratios) else "FAIL"


def report(results: list[Result], markdown: bool) -> None:
    head = (
        "framework",
        "model",
        "layer",
        "forward ms",
        "hand vjp Grad-CAM ms",
        "adapter Grad-CAM ms",
        "adapter / hand",
        "paired",
        "CPU-time ratio",
        "FLOP ratio",
        "max |diff|",
        f"<= {RATIO_TARGET}x",
    )
    rows = []
    for r in results:
        fwd, hand, ada = (median(r.times[k]) for k in ("forward", "hand", "adapter"))
        ratio = ada / hand
        paired = paired_ratio(r.times["adapter"], r.times["hand"])
        cpu = median(r.cpu_times["adapter"]) / median(r.cpu_times["hand"])
        rows.append(
            (
                r.case.framework,
                r.case.model,
                r.case.layer,
                f"{fwd * 1e3:.2f}",
                f"{hand * 1e3:.2f}",
                f"{ada * 1e3:.2f}",
                f"{ratio:.3f}x",
                f"{paired:.3f}x",
                f"{cpu:.3f}x",
                f"{r.gflop['adapter'] / r.gflop['hand']:.4f}x",
                f"{r.max_diff:.1e}",
                verdict(ratio, paired, cpu),
            )
        )
    print(table(head, rows, align="llllrrrrrrrl", markdown=markdown))
    print()
    print(
        "adapter / hand: median adapter time / median hand time (wall); paired: the median over rounds of "
        "adapter / hand in the same round;"
    )
    print(
        "CPU-time ratio: median process CPU time per call, adapter / hand (not counting time spent waiting "
        "for a core); FLOP ratio: XLA's FLOP count, adapter / hand (load-independent)."
    )
    print(
        f"PASS: at least two of the three time ratios <= {RATIO_TARGET}. Information only: the exit status "
        f"ignores timings."
    )
    for r in results:
        spread = ", ".join(f"{k} {min(t) * 1e3:.1f}..{max(t) * 1e3:.1f}" for k, t in r.times.items())
        compile_s = ", ".join(f"{k} {s:.1f}" for k, s in r.compile_s.items())
        print(
            f"  {r.case.framework}: max |diff| {r.max_diff:.1e} (max |map| {r.max_abs:.3g}; "
            f"{'agree' if r.max_diff <= AGREE_TOL else 'DISAGREE'} at {AGREE_TOL:g}); "
            f"wall min..max ms: {spread}; compile s: {compile_s}"
        )


def versions(frameworks) -> str:
    import importlib.metadata as md

    names = {
        "linen": "flax",
        "nnx": "flax",
        "equinox": "equinox",
        "haiku": "dm-haiku",
        "keras": "keras",
        "hf": "transformers",
    }
    out = [f"jax {jax.__version__}"]
    for dist in dict.fromkeys(names[f] for f in frameworks):
        try:
            out.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return ", ".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds (default 7)")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=0.2,
        help="within a round, each call repeats for at least this long; its mean is the round's time "
        "(default 0.2)",
    )
    p.add_argument(
        "--frameworks",
        default=",".join(FRAMEWORKS),
        help=f"comma-separated, from {','.join(FRAMEWORKS)} (default: all)",
    )
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = [f for f in args.frameworks if f not in BUILDERS]
    if unknown:
        raise SystemExit(f"unknown --frameworks {unknown}; choose from {','.join(FRAMEWORKS)}")
    if args.repeats < 1 or args.batch < 1 or args.size < 32:
        raise SystemExit("--repeats and --batch must be positive and --size at least 32.")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = jax.devices()[0]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(
        f"{datetime.date.today().isoformat()}; device: {device.platform} / {device.device_kind}; "
        f"host: {platform.machine()}, {os.cpu_count()} CPUs, load average {load}"
    )
    print(versions(args.frameworks))
    print(
        f"batch {args.batch}, {args.size}x{args.size} px, target class {TARGET_CLASS}, {args.repeats} "
        f"interleaved rounds, order reversed every other round (each call repeated for "
        f">= {args.min_seconds} s per round), medians; compile + 1 warm-up excluded"
    )
    print()
    results = []
    for name in args.frameworks:
        try:
            case = BUILDERS[name](args)
        except (Skipped, ImportError) as err:
            print(f"{name}: skipped ({err})")
            continue
        results.append(measure(case, args))
        r = results[-1]
        print(
            f"{name}: measured (max |diff| {r.max_diff:.1e}; adapter / hand "
            f"{median(r.times['adapter']) / median(r.times['hand']):.3f}x)",
            flush=True,
        )
    print()
    if results:
        report(results, args.markdown)
    if any(r.max_diff > AGREE_TOL for r in results):
        raise SystemExit(f"the adapter's maps differ from the hand-written ones by more than {AGREE_TOL:g}")


if __name__ == "__main__":
    main()
