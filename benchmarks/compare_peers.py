"""gradcam_jax side by side with its peers, pytorch-grad-cam and Captum: map agreement and speed.

    python -m benchmarks.compare_peers --quick          # small batch and size: minutes on a CPU
    python -m benchmarks.compare_peers                  # batch 8, 224 px, float32
    python -m benchmarks.compare_peers --gpu            # batch 256, 224 px, float32 + bfloat16

The same two networks are built in both frameworks with the same weights (ResNet-50 with
random weights ported from torch; EfficientNet-Lite0 with its ImageNet checkpoint: see
``benchmarks/peers/models.py``). The inputs are crops of the bundled demo photo; every method
explains the same class per image (our model's top class) in every implementation. For
Grad-CAM, Grad-CAM++, Guided Backprop, Guided Grad-CAM and Score-CAM it prints

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
preset on a GPU machine. See benchmarks/README.md for how to read the output; the code is in
``benchmarks/peers/``.
"""

import os

# Before jax/torch/tqdm are imported: jax must not grab 75% of the GPU (torch shares it), and
# pytorch-grad-cam's Score-CAM draws a progress bar per image.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from .peers.run import main  # noqa: E402

if __name__ == "__main__":
    main()
