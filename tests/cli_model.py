"""A model for ``gradcam-jax explain-dir --model cli_model:tiny_tap`` in tests/test_cli.py: the
small conv net of tests/nets.py as a bare tap (no class names, no preprocessing)."""

import nets

import gradcam_jax as gcj


def tiny_tap():
    """tests/nets.py's net split after its second conv block (maps at the input's resolution)."""
    features, head = nets.split_functions(nets.weights(0))
    return gcj.split_tap(features, head)
