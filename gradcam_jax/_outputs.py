"""Where a model's scores are in its output: ``output=`` of every adapter.

A model may return an array of scores, a dict, a dataclass or named tuple with ``.logits``
(Hugging Face), a tuple, or anything a callable can read the scores from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["pick_output"]


def _fields(out) -> list[str]:
    if isinstance(out, Mapping):
        return [str(k) for k in out]
    if hasattr(out, "_fields"):
        return list(out._fields)
    if dataclasses.is_dataclass(out):
        return [f.name for f in dataclasses.fields(out)]
    return [n for n in vars(out) if not n.startswith("_")] if hasattr(out, "__dict__") else []


def pick_output(out: Any, output: str | int | Callable | None = None) -> Any:
    """The scores from a model's output.

    ``output``: ``None`` (an array is used as is; otherwise ``.logits`` / ``["logits"]`` when
    present), a field or key name, an index (tuple outputs), or a callable ``output -> scores``.

    Examples:
      >>> from gradcam_jax._outputs import pick_output
      >>> pick_output({"logits": 1.0, "hidden": 2.0}), pick_output((3.0, 4.0), 1)
      (1.0, 4.0)
    """
    if callable(output):
        return output(out)
    if output is None:
        if hasattr(out, "shape"):
            return out
        if isinstance(out, Mapping) and "logits" in out:
            return out["logits"]
        if getattr(out, "logits", None) is not None:
            return out.logits
        raise ValueError(
            f"The model returns a {type(out).__name__}, not an array of scores, and it has no 'logits'. "
            f"Pass output= (a field name, an index or a callable output -> scores); its fields: "
            f"{', '.join(_fields(out)) or '(none found)'}."
        )
    if not isinstance(output, str):  # an index into a tuple or list output
        return out[output]
    if isinstance(out, Mapping):
        if output not in out:
            raise ValueError(
                f"output={output!r} is not in the model's output; its keys: {', '.join(_fields(out))}."
            )
        return out[output]
    if not hasattr(out, output):
        raise ValueError(
            f"output={output!r} is not a field of {type(out).__name__}; "
            f"its fields: {', '.join(_fields(out))}."
        )
    return getattr(out, output)
