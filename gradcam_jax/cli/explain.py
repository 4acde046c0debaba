"""The ``explain`` command: explain a pretrained classifier's predictions on image files.

    gradcam-jax explain photo.jpg other.png --classes top3 --out explanations/
    gradcam-jax explain --demo

For each readable image it writes one PNG figure (a row per explained class: the image, then
one panel per method) and, for the whole run, ``results.json`` (the top classes and their
probabilities, the classes explained, the files written, the method(s) and the layer).
Unreadable files are reported and skipped; the command then exits with status 1.

Images are decoded by :func:`gradcam_jax.dataset.load_image`, as ``explain-dir`` decodes them.
Figures are drawn from the image downscaled to at most :data:`FIGURE_MAX_SIDE` pixels on its long
side (the maps are computed from the full image as always) and hold at most
:data:`~.explain_job.FIGURE_ROWS` classes; ``results.json`` lists every class of ``--classes``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image

from .. import viz, zoo
from .._cam import cam, method_names
from ..dataset import OutputNotWritable, RecordError, load_image
from .common import EXIT_FAILED_FILES, EXIT_OK, EXIT_STATUS_HELP, PROG, Progress, error, positive_int
from .explain_job import (
    DEFAULT_METHODS,
    DEMO_CLASSES,
    FIGURE_ROWS,
    PIXEL_METHODS,
    Job,
)
from .models import Model
from .transformers import ATTENTION_METHODS, attention_job, attention_maps

__all__ = [
    "add_parser",
    "run",
    "read_image",
    "figure_image",
    "explain_batch",
    "Output",
    "EXAMPLES",
    "FIGURE_MAX_SIDE",
]


#: Figures are drawn from the image downscaled to at most this many pixels on its long side.
FIGURE_MAX_SIDE = 2048

METHODS_HELP = textwrap.fill(
    f"methods: any gradient method of gradcam_jax ({', '.join(method_names('gradient'))}), "
    f"plus {' and '.join(PIXEL_METHODS)}; for transformers also {', '.join(ATTENTION_METHODS)}.",
    width=92,
)
EXAMPLES = f"""\
examples:
  {PROG} explain --demo
      explain the bundled two-object picture (a cat and an espresso cup) for its two
      classes; writes gradcam-out/demo.png and gradcam-out/results.json
  {PROG} explain photos/*.jpg --classes top3 --out maps/
      one figure per photo, one row for each of its three most probable classes
  {PROG} explain dog.jpg --classes "285,boxer" --methods grad_cam,grad_cam_plus_plus
      chosen classes (ImageNet indices or exact names), two CAM methods side by side
  {PROG} explain dog.jpg --layer blocks_15 --methods grad_cam
      explain at another layer; `{PROG} layers` lists them
  {PROG} explain scan.png --model mypackage.models:classifier --classes top1
      your own model: a factory returning preprocess, tap, logits, class_names (and tap_at)
  {PROG} explain cat.png --model vits:factory --methods attention_rollout,generic_attention,legrad
      a vision transformer: maps from its attention (legrad needs the model's attention_head)

{METHODS_HELP}
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``explain`` to the command's sub-commands; its parsed arguments carry ``func=run``."""
    ex = subparsers.add_parser(
        "explain",
        help="explain a model's predictions on image files; write PNG figures and results.json",
        description="Explain a pretrained classifier's predictions on IMAGE files. Writes one PNG "
        "per image (a row per class: the image, then one panel per method) and "
        "results.json into --out.",
        epilog=EXAMPLES + "\n" + EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_input_arguments(ex)
    _add_output_arguments(ex)
    ex.set_defaults(func=run)
    return ex


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    """What to explain: images, model, classes, methods, layer."""
    p.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image files (JPEG, PNG, ... anything Pillow reads); unreadable ones are reported and skipped",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="explain the bundled demo picture (a cat and an espresso cup side by side; "
        f"classes {DEMO_CLASSES} unless --classes is given)",
    )
    p.add_argument(
        "--model",
        default="efficientnet_lite0",
        metavar="NAME|MODULE:FACTORY",
        help=f"zoo model (default: %(default)s; available: {', '.join(zoo.MODELS)}), or your own: "
        "MODULE:FACTORY or FILE.py:FACTORY, a function called with no arguments returning an object "
        "with preprocess(images), tap, logits(x) (or probs(x)), class_names and optionally "
        "tap_at(layer), layers, input_size, name (see gradcam_jax.cli.models.ExplainableModel)",
    )
    p.add_argument(
        "--classes",
        default=None,
        metavar="SPEC",
        help="which classes to explain per image: topK (the K most probable, default "
        "top3) or a comma-separated list of class indices and/or exact class "
        f"names, e.g. 285,967 or 'tabby,espresso'. Figures (and --save-maps) hold the first {FIGURE_ROWS}; "
        "results.json lists them all",
    )
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        metavar="LIST",
        help="comma-separated methods, one figure column each (default: %(default)s)",
    )
    p.add_argument(
        "--layer",
        default=None,
        metavar="PATH",
        help="layer to explain at, as a module path (default: the model's last "
        "convolutional feature map, 'head' for efficientnet_lite0; your own model's tap_at(PATH)); "
        f"see `{PROG} layers`",
    )


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how: the folder, the batch size, the figures' look."""
    p.add_argument(
        "--out",
        default="gradcam-out",
        metavar="DIR",
        help="output folder, created if needed (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        metavar="N",
        help="images per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--alpha", type=float, default=0.5, help="heatmap opacity in overlays (default: %(default)s)"
    )
    p.add_argument("--cmap", default="jet", help="Matplotlib colormap for heatmaps (default: %(default)s)")
    p.add_argument("--dpi", type=positive_int, default=150, help="figure resolution (default: %(default)s)")
    p.add_argument(
        "--save-maps",
        action="store_true",
        help="also write each image's raw maps and class indices as NAME.npz",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def read_image(path: str) -> np.ndarray:
    """The file as a uint8 RGB array (``explain-dir``'s decoder, at the file's size), or raise
    ValueError with a readable reason."""
    try:
        return load_image(path, size=None)
    except RecordError as e:
        raise ValueError(str(e)) from None


def figure_image(image: np.ndarray) -> np.ndarray:
    """``image`` downscaled (antialiased) to at most :data:`FIGURE_MAX_SIDE` pixels on its long
    side, for drawing: a figure's panels are a few hundred pixels wide whatever the photo."""
    h, w = image.shape[:2]
    scale = FIGURE_MAX_SIDE / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


@dataclass
class Output:
    """What a run has written so far (figures, maps, records) and the files it could not read."""

    job: Job
    progress: Progress
    records: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    stems: set[str] = field(default_factory=set)

    def fail(self, path: str, reason: str) -> None:
        self.errors.append({"path": path, "error": reason})
        if self.progress.enabled and self.progress.tty:  # end the bar's partial line first
            sys.stderr.write("\n")
        error(f"cannot read {path!r}: {reason}; skipped.")
        self.progress.update(1, Path(path).name)

    def explain(self, batch: list[tuple[str, np.ndarray]]) -> None:
        """Explain one batch of decoded images and write their figures (and maps)."""
        job = self.job
        x = np.asarray(job.model.preprocess([image for _, image in batch]))
        if len(batch) < job.batch_size:  # pad to a fixed batch: one compilation for the whole run
            x = np.concatenate([x, np.repeat(x[-1:], job.batch_size - len(batch), axis=0)])
        probs = np.asarray(job.model.probs(x))
        if job.fixed is None:
            targets = np.argsort(-probs, axis=-1)[:, : job.k]
        else:
            targets = np.broadcast_to(np.asarray(job.fixed, np.int64), (x.shape[0], job.k))
        maps = explain_batch(job, x, targets[:, :FIGURE_ROWS])
        for i, (path, image) in enumerate(batch):
            self._write(path, image, {m: maps[m][i] for m in job.methods}, targets[i], probs[i])
            self.progress.update(1, Path(path).name)

    def _write(
        self,
        path: str,
        image: np.ndarray,
        maps: dict[str, np.ndarray],
        targets: np.ndarray,
        probs: np.ndarray,
    ) -> None:
        job = self.job
        stem = _unique_stem(path, self.stems)
        title = f"{Path(path).name}  ·  {_pretty_model(job.model.name)}  ·  layer {job.layer}"
        names = job.model.class_names
        drawn = targets[:FIGURE_ROWS]
        fig = viz.figure_grid(
            figure_image(image),
            maps,
            drawn.tolist(),
            class_names=names,
            probs=probs,
            title=title,
            **job.style,
        )
        png = job.out_dir / f"{stem}.png"
        files = [str(png)]
        try:
            viz.save_png(fig, png)
            if job.save_maps:
                npz = job.out_dir / f"{stem}.npz"
                arrays: dict[str, Any] = {"classes": np.asarray(drawn), "probs": probs, **maps}
                np.savez_compressed(npz, **arrays)
                files.append(str(npz))
        except OSError as e:
            raise _not_written(e) from None
        self.written.extend(files)
        self.records.append(
            {
                "path": path,
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "top": [_class_record(job.model, c, probs) for c in np.argsort(-probs)[:5]],
                "explained": [_class_record(job.model, c, probs) for c in targets],
                "files": files,
            }
        )


def explain_batch(job: Job, x: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """All maps for one batch: method -> (B, K, H, W) heatmaps or (B, K, H, W, C) gradients."""
    t = jnp.asarray(targets, jnp.int32)
    out = {}
    for name in job.methods:
        if name in ATTENTION_METHODS:
            out[name] = np.asarray(attention_maps(job.model, name, x, t))
        elif name in PIXEL_METHODS:
            out[name] = np.asarray(PIXEL_METHODS[name](job.tap, x, target=t))
        else:
            out[name] = np.asarray(cam(job.tap, x, target=t, method=name))
    return out


def _not_written(e: OSError) -> OutputNotWritable:
    return OutputNotWritable(f"cannot write {str(e.filename or 'the output')!r}: {e.strerror or e}.")


def figure_note(job: Job) -> str | None:
    """Why the figures hold fewer classes than ``--classes`` asks for (``None``: they do not)."""
    if job.k <= FIGURE_ROWS:
        return None
    return (
        f"--classes {job.classes_spec}: figures (and --save-maps) hold each image's first {FIGURE_ROWS} "
        f"of its {job.k} classes; results.json lists all {job.k}."
    )


def _unique_stem(path: str, taken: set[str]) -> str:
    stem = re.sub(r"[^\w.\-]+", "_", Path(path).stem) or "image"
    name, i = stem, 2
    while name.lower() in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name.lower())
    return name


def _class_record(model: Model, c, probs: np.ndarray) -> dict:
    c = int(c)
    name = f"class {c}" if model.class_names is None else model.class_names[c]
    return {"index": c, "name": name, "prob": round(float(probs[c]), 6)}


def _pretty_model(name: str) -> str:
    return {"efficientnet_lite0": "EfficientNet-Lite0"}.get(name, name)


def _write_results(output: Output, seconds: float) -> Path:
    """Write the run's ``results.json``; returns its path."""
    job = output.job
    summary = {
        "model": job.model.name,
        "layer": job.layer,
        "methods": job.methods,
        "method": ",".join(job.methods),
        "classes": job.classes_spec,
        "input_size": job.model.input_size,
        "figure_rows": min(job.k, FIGURE_ROWS),
        **({"note": note} if (note := figure_note(job)) else {}),
        "images": output.records,
        "errors": output.errors,
        "files": output.written,
        "seconds": seconds,
    }
    results = job.out_dir / "results.json"
    try:
        results.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise _not_written(e) from None
    return results


def run(args: argparse.Namespace) -> int:
    """Run ``explain`` for parsed ``args``: 0, or 1 when some files could not be read.

    Raises :class:`UsageError` for bad arguments (before anything is written but the folder), and
    :class:`~gradcam_jax.dataset.OutputNotWritable` when ``--out`` cannot be written (checked
    before the model is loaded).
    """
    started = time.perf_counter()
    job = attention_job(args)
    note = figure_note(job)
    if note and not args.quiet:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    output = Output(job, Progress(len(job.paths), enabled=not args.quiet))
    pending: list[tuple[str, np.ndarray]] = []
    for path in job.paths:
        try:
            pending.append((path, read_image(path)))
        except (OSError, ValueError) as e:
            output.fail(path, str(e))
            continue
        if len(pending) == job.batch_size:
            output.explain(pending)
            pending = []
    if pending:
        output.explain(pending)
    seconds = round(time.perf_counter() - started, 2)
    results = _write_results(output, seconds)
    if not args.quiet:
        for rec in output.records:
            shown, more = rec["explained"][:FIGURE_ROWS], len(rec["explained"]) - FIGURE_ROWS
            best = ", ".join(f"{c['name']} {100 * c['prob']:.1f}%" for c in shown)
            best += f" and {more} more" if more > 0 else ""
            print(f"{rec['path']}: {best} -> {rec['files'][0]}", file=sys.stderr)
        failed = f"; {len(output.errors)} file(s) could not be read" if output.errors else ""
        print(
            f"wrote {len(output.records)} figure(s) and {results} in {seconds:.1f}s" + failed, file=sys.stderr
        )
    return EXIT_FAILED_FILES if output.errors else EXIT_OK
