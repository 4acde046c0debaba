"""Reading a PyTorch state dict by parameter name, for the weight converters of the architectures.

Each architecture in :mod:`gradcam_jax.models` maps its PyTorch parameter names to its Flax
module paths. :class:`TorchNames` holds what every such map repeats: take a tensor by name
(each one at most once), change the layouts — a convolution kernel from torch's
``(out, in, kh, kw)`` to Flax's ``(kh, kw, in, out)``, a dense kernel transposed, a
BatchNorm's ``weight``/``bias``/``running_mean``/``running_var`` to Flax's ``scale``/``bias``
(params) and ``mean``/``var`` (batch_stats) — and, at the end, check that no tensor was left
over. PyTorch itself is never imported: a state dict of NumPy arrays (from
:func:`gradcam_jax.zoo.load_pth`) and one of torch tensors both work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["TorchNames", "state_dict_arrays"]


def state_dict_arrays(model_or_state: Any) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` from a torch module (its ``state_dict()``) or a state dict.

    Floating-point torch tensors become float32 arrays; other tensors keep their dtype. NumPy
    arrays pass through.
    """
    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    out = {}
    for name, value in state.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu()
            value = (value.float() if value.is_floating_point() else value).numpy()
        out[name] = np.asarray(value)
    return out


class TorchNames:
    """Takes tensors out of a PyTorch state dict by name, for one conversion to Flax variables.

    Args:
      state: the state dict (``{name: array or tensor}``).
      source: how error messages name it (``"The checkpoint"``).
      kind: what it should be, for the missing-tensor error (``"an EfficientNet-Lite state dict"``).
      layout: what reads it, for the left-over error (``"this architecture"``).
    """

    def __init__(self, state: Mapping[str, Any], *, source: str, kind: str, layout: str):
        self.state = state
        self.source, self.kind, self.layout = source, kind, layout
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> np.ndarray:
        """The tensor ``key`` as a float32 array, marked as used."""
        if key not in self.state:
            raise ValueError(f"{self.source} has no tensor {key!r}; is it {self.kind}?")
        self.used.add(key)
        return np.asarray(self.state[key], np.float32)

    def conv(self, key: str) -> dict[str, np.ndarray]:
        """A bias-free convolution: torch's ``(out, in / groups, kh, kw)`` kernel, Flax's layout."""
        return {"kernel": np.ascontiguousarray(np.transpose(self.take(key + ".weight"), (2, 3, 1, 0)))}

    def bn(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """A BatchNorm's ``(params, batch_stats)``."""
        return (
            {"scale": self.take(key + ".weight"), "bias": self.take(key + ".bias")},
            {"mean": self.take(key + ".running_mean"), "var": self.take(key + ".running_var")},
        )

    def dense(self, key: str) -> dict[str, np.ndarray]:
        """A linear layer: Flax's kernel is torch's ``weight`` transposed."""
        kernel = np.ascontiguousarray(self.take(key + ".weight").T)
        return {"kernel": kernel, "bias": self.take(key + ".bias")}

    def check_all_used(self) -> None:
        """Raise ``ValueError`` if a tensor other than a BatchNorm step counter was never taken."""
        unused = sorted(k for k in self.state if k not in self.used and not k.endswith("num_batches_tracked"))
        if unused:
            raise ValueError(f"{self.source} has tensors {self.layout} does not use: {unused[:10]}.")
