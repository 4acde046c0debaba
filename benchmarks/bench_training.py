"""Decoy digits: training with explanation losses, after Ross et al. 2017's DecoyMNIST.

    python -m benchmarks.bench_training [--epochs 8] [--seeds 0 1] [--markdown FILE]

Data. scikit-learn's bundled digits (1,797 8 x 8 images, 10 classes), each upsampled 3x
(nearest) to 24 x 24 and placed in the middle of a 32 x 32 canvas, 0-1 scale. A 4 x 4 grey
*decoy* patch goes in a random corner. Train time: its brightness encodes the label,
``(255 - 25 y) / 255`` (DecoyMNIST's rule, Ross, Hughes & Doshi-Velez, IJCAI 2017,
https://arxiv.org/abs/1703.03717, section 4.2). Test time: the brightness is that of a random
label, so the decoy carries no information. 80/20 split, stratified.

Model. The same small CNN for every run: conv 3x3 (16) - ReLU - max-pool 2 - conv 3x3 (32) -
ReLU (the Grad-CAM layer, 16 x 16) - max-pool 2 - dense 64 - ReLU - dense 10. Adam (optax,
learning rate 1e-3), batch 64, ``--epochs`` epochs, trained from the same initialisation with:

- ``plain``: cross-entropy only;
- ``rrr``: + ``lambda * gcj.losses.input_gradient_penalty`` (Ross et al.'s penalty on the input
  gradients of the summed log-probabilities outside the digit's 24 x 24 box);
- ``cam``: + ``lambda * gcj.losses.cam_alignment`` (the fraction of the label's Grad-CAM mass,
  at the 16 x 16 layer, outside that box);
- ``hires``: the same with ``method="hires_cam"`` (``ReLU(sum_k g^k * A^k)``, element-wise: the
  head reads the layer through a flatten and a dense layer, which Grad-CAM's spatially averaged
  weights do not see).

Reported, on the decoy test set (mean over seeds; spread in brackets): accuracy; Grad-CAM's
pointing game on the digit (the map's maximum, upsampled to 32 x 32, falls inside the digit's
box); and the fraction of Grad-CAM mass, and of HiResCAM mass, on the decoy patch (HiResCAM,
``ReLU(sum_k g^k * A^k)``, is faithful to this flatten -> dense head; Grad-CAM's spatially
averaged weights are not, so its decoy mass can stay small for a model that reads the decoy).
Also the accuracy on test images with the train-time (label-encoding) decoy, which shows what
the plain model learnt.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradcam_jax as gcj

from .harness import table

CANVAS, MARGIN, PATCH = 32, 4, 4
CORNERS = ((0, 0), (0, CANVAS - PATCH), (CANVAS - PATCH, 0), (CANVAS - PATCH, CANVAS - PATCH))


def decoy_digits(seed: int):
    """(x_train, y_train, x_test_decoy, x_test_leak, y_test, digit_mask, test_corners)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.kron(digits.images / 16.0, np.ones((3, 3)))  # (N, 24, 24)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    rng = np.random.default_rng(seed)

    def place(imgs, labels, brightness_of):
        out = np.zeros((len(imgs), CANVAS, CANVAS, 1), np.float32)
        out[:, MARGIN : MARGIN + 24, MARGIN : MARGIN + 24, 0] = imgs
        corners = rng.integers(0, 4, size=len(imgs))
        for i, (c, y) in enumerate(zip(corners, labels, strict=True)):
            r0, c0 = CORNERS[c]
            out[i, r0 : r0 + PATCH, c0 : c0 + PATCH, 0] = brightness_of(y)
        return out, corners

    def leak(y):
        return (255 - 25 * y) / 255.0

    x_train, _ = place(x_tr, y_tr, leak)
    x_leak, _ = place(x_te, y_te, leak)
    x_decoy, corners = place(x_te, y_te, lambda y: leak(rng.integers(0, 10)))
    mask = np.zeros((CANVAS, CANVAS), np.float32)
    mask[MARGIN : MARGIN + 24, MARGIN : MARGIN + 24] = 1.0
    return x_train, y_tr.astype(np.int32), x_decoy, x_leak, y_te.astype(np.int32), mask, corners


def init_params(seed: int):
    rng = np.random.default_rng(1000 + seed)

    def he(*shape):
        return jnp.asarray(rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1])), jnp.float32)

    return {
        "c1": he(3, 3, 1, 16), "b1": jnp.zeros(16), "c2": he(3, 3, 16, 32), "b2": jnp.zeros(32),
        "d1": he(8 * 8 * 32, 64), "e1": jnp.zeros(64), "d2": he(64, 10), "e2": jnp.zeros(10),
    }  # fmt: skip


def conv(x, w, b):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b


def pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def apply(p, x, edit):
    """The CNN as a tap: ``(logits, A)`` with ``A`` the second conv's ReLU output (B, 16, 16, 32)."""
    a = jax.nn.relu(conv(pool(jax.nn.relu(conv(x, p["c1"], p["b1"]))), p["c2"], p["b2"]))
    seen = a if edit is None else edit(a)
    h = jax.nn.relu(pool(seen).reshape(x.shape[0], -1) @ p["d1"] + p["e1"])
    return h @ p["d2"] + p["e2"], a


def logits_fn(p, x):
    return apply(p, x, None)[0]


def loss_fn(p, x, y, *, mask, kind: str, weight: float):
    task = optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), y).mean()
    if kind == "rrr":
        return task + weight * gcj.losses.input_gradient_penalty(logits_fn, p, x, y, mask)
    if kind in ("cam", "hires"):
        method = "grad_cam" if kind == "cam" else "hires_cam"
        return task + weight * gcj.losses.cam_alignment(gcj.Tap(apply, p), x, y, mask, method=method)
    return task


def train(kind: str, weight: float, data, seed: int, epochs: int, batch: int = 64):
    x, y, mask = data[0], data[1], data[5]
    params = init_params(seed)
    opt = optax.adam(1e-3)
    state = opt.init(params)

    grad = jax.grad(functools.partial(loss_fn, mask=mask, kind=kind, weight=weight))

    @jax.jit
    def step(params, state, xb, yb):
        updates, state = opt.update(grad(params, xb, yb), state)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            params, state = step(params, state, x[idx], y[idx])
    return params


def evaluate(params, data) -> dict[str, float]:
    _, _, x_decoy, x_leak, y, mask, corners = data
    logits = np.asarray(jax.jit(logits_fn)(params, x_decoy))
    leak_logits = np.asarray(jax.jit(logits_fn)(params, x_leak))
    tap = gcj.Tap(apply, params)
    maps = np.asarray(gcj.grad_cam(tap, x_decoy, target=y, normalize=False))  # (N, 32, 32)
    hires = np.asarray(gcj.cam(tap, x_decoy, target=y, method="hires_cam", normalize=False))
    peak_r, peak_c = np.unravel_index(maps.reshape(len(maps), -1).argmax(-1), (CANVAS, CANVAS))
    on_digit = mask[peak_r, peak_c] > 0
    decoy = np.zeros_like(maps)
    for i, c in enumerate(corners):
        r0, c0 = CORNERS[c]
        decoy[i, r0 : r0 + PATCH, c0 : c0 + PATCH] = 1.0

    def decoy_mass(m):
        total = m.sum((1, 2))
        return float(np.mean(np.where(total > 0, (m * decoy).sum((1, 2)) / np.maximum(total, 1e-12), 0.0)))

    return {
        "acc": float((logits.argmax(-1) == y).mean()),
        "leak_acc": float((leak_logits.argmax(-1) == y).mean()),
        "pointing": float(on_digit.mean()),
        "decoy_mass": decoy_mass(maps),
        "hires_decoy_mass": decoy_mass(hires),
    }


RUNS = (("plain", 0.0), ("rrr", 1.0), ("cam", 1.0), ("hires", 1.0))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    results: dict[str, list[dict]] = {name: [] for name, _ in RUNS}
    seconds: dict[str, float] = {name: 0.0 for name, _ in RUNS}
    for seed in args.seeds:
        data = decoy_digits(seed)
        for name, weight in RUNS:
            t = time.perf_counter()
            params = train(name, weight, data, seed, args.epochs)
            seconds[name] += time.perf_counter() - t
            results[name].append(evaluate(params, data))
            print(f"seed {seed} {name:5s} {results[name][-1]}", flush=True)

    def cell(name, key, pct=True):
        v = np.array([r[key] for r in results[name]]) * (100 if pct else 1)
        return f"{v.mean():.1f} [{v.min():.1f}-{v.max():.1f}]"

    header = ["model (loss weight)", "decoy test acc %", "pointing game %", "Grad-CAM mass on decoy %",
              "HiResCAM mass on decoy %", "acc with train-time decoy %", "train s / seed"]  # fmt: skip
    rows = [
        [f"{name} ({weight:g})", cell(name, "acc"), cell(name, "pointing"), cell(name, "decoy_mass"),
         cell(name, "hires_decoy_mass"), cell(name, "leak_acc"), f"{seconds[name] / len(args.seeds):.0f}"]
        for name, weight in RUNS
    ]  # fmt: skip
    note = (
        f"decoy digits, {args.epochs} epochs, seeds {args.seeds}, {jax.devices()[0].platform}; "
        f"mean [min-max] over seeds; total {time.perf_counter() - start:.0f} s (shared, noisy machine)"
    )
    print("\n" + note)
    print(table(header, rows))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(note + "\n\n" + table(header, rows, markdown=True) + "\n")


if __name__ == "__main__":
    main()
