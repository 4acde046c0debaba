"""The ``explain`` command's job: its arguments checked and resolved against the model (a zoo
model, or your own from ``--model MODULE:FACTORY``: see :mod:`.models`).

:func:`job_from_args` turns parsed arguments into a :class:`Job` (what to read, explain and
write) or raises :class:`~.common.UsageError` naming the first problem; :mod:`.explain` runs it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import matplotlib

from .. import zoo
from .._cam import method_names
from ..dataset.lock import OutputNotWritable
from ..guided import guided_backprop, guided_grad_cam
from .common import UsageError, parse_classes, parse_methods
from .models import Model, class_count, layer_tap, load_model

__all__ = [
    "Job",
    "job_from_args",
    "output_folder",
    "DEMO_CLASSES",
    "PIXEL_METHODS",
    "DEFAULT_METHODS",
    "METHODS",
    "FIGURE_ROWS",
]

#: The two objects in the demo picture: espresso (967, right) and Egyptian cat (285, left).
DEMO_CLASSES = "967,285"
#: Methods whose maps are input gradients ``(H, W, C)``, drawn as images rather than heatmaps.
PIXEL_METHODS: dict[str, Callable[..., jax.Array]] = {
    "guided_backprop": guided_backprop,
    "guided_grad_cam": guided_grad_cam,
}
DEFAULT_METHODS = "grad_cam,guided_backprop,guided_grad_cam"
#: The CAM methods (every gradient method of gradcam_jax), then the pixel-space ones.
METHODS = (*method_names("gradient"), *PIXEL_METHODS)
#: The most classes a figure draws (one row each) and ``--save-maps`` keeps per image; results.json
#: lists all of ``--classes``.
FIGURE_ROWS = 10


@dataclass(frozen=True)
class Job:
    """One ``explain`` run, its arguments checked: what to read, explain and write."""

    paths: list[str]
    classes_spec: str
    methods: list[str]
    model: Model
    layer: str
    tap: object  # the model split at ``layer``
    fixed: list[int] | None  # the classes named in --classes; None: each image's top k
    k: int  # classes per image in results.json; the first min(k, FIGURE_ROWS) are drawn
    batch_size: int
    out_dir: Path
    style: dict  # viz.figure_grid's alpha, cmap and dpi
    save_maps: bool


def job_from_args(args: argparse.Namespace) -> Job:
    """Check ``args`` (a :class:`UsageError` names the first problem) and resolve them."""
    paths = list(args.images)
    if args.demo:
        paths.insert(0, str(zoo.DEMO_IMAGE))
    if not paths:
        raise UsageError("no images given: pass IMAGE files, or --demo for the bundled example.")
    classes_spec = args.classes or (DEMO_CLASSES if args.demo and not args.images else "top3")
    classes = parse_classes(classes_spec)
    methods = list(dict.fromkeys(parse_methods(args.methods, METHODS)))
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1]; got {args.alpha}.")
    if args.cmap not in matplotlib.colormaps:
        raise UsageError(
            f"--cmap {args.cmap!r} is not a Matplotlib colormap (try jet, turbo, inferno, viridis)."
        )
    out_dir = output_folder(args.out)  # before the model: an unwritable folder fails fast
    model = load_model(args.model)
    fixed, k = _resolve_classes(classes, model)
    layer, tap = layer_tap(model, args.layer)
    style = {"alpha": args.alpha, "cmap": args.cmap, "dpi": args.dpi}
    batch_size = min(args.batch_size, len(paths))
    return Job(
        paths, classes_spec, methods, model, layer, tap, fixed, k, batch_size, out_dir, style, args.save_maps
    )


def output_folder(out: str) -> Path:
    """``--out``, created and checked writable; :class:`OutputNotWritable` (exit status 3) if not."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputNotWritable(
            f"cannot write the output folder {str(path)!r}: {e.strerror or e}"
            + (f" ({e.filename})" if e.filename and str(e.filename) != str(path) else "")
            + "."
        ) from None
    return path


def _resolve_classes(classes: int | list[int | str], model: Model) -> tuple[list[int] | None, int]:
    """The classes named in ``--classes`` (None: each image's most probable ones) and how many."""
    n = class_count(model)
    if isinstance(classes, int):
        if classes > n:
            raise UsageError(f"--classes top{classes}: {model.name} has only {n} classes.")
        return None, classes
    out = []
    for item in classes:
        if isinstance(item, int):
            if not 0 <= item < n:
                raise UsageError(
                    f"--classes: class index {item} is out of range; {model.name} has {n} "
                    f"classes (0-{n - 1})."
                )
            out.append(item)
        else:
            try:
                out.append(model.class_index(item))
            except ValueError as e:
                raise UsageError(f"--classes: {e}") from None
    return out, len(out)
