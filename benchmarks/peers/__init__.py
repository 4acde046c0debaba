"""gradcam_jax side by side with pytorch-grad-cam and Captum: ``python -m benchmarks.compare_peers``.

``common`` (names, presets, targets), ``options`` (the command line), ``environment`` (what
imports, devices, versions), ``torch_resnet`` (the torch ResNet when torchvision is missing),
``models`` (one network in both frameworks, same weights), ``measure`` (interleaved timing and
memory of one method), ``implementations`` (ours and the peers' runners), ``agreement`` (map
agreement and the notes on conventions), ``report`` (tables, notes, targets) and ``run`` (the
whole comparison).
"""
