"""The ``gradcam-jax`` command: explain a pretrained classifier's predictions on image files.

    gradcam-jax explain photo.jpg other.png --classes top3 --out explanations/
    gradcam-jax explain --demo
    gradcam-jax layers
    gradcam-jax explain-dir photos/ --out maps.zarr     (gradcam_jax.dataset, when present)

For each readable image it writes one PNG figure (a row per explained class: the image, then
one panel per method) and, for the whole run, ``results.json`` (the top classes and their
probabilities, the classes explained, the files written, the method(s) and the layer).
Unreadable files are reported and skipped; the command then exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .zoo import DEMO_IMAGE  # the bundled two-object picture
from ._argtypes import positive_int as _positive_int

__all__ = ["main", "build_parser"]

PROG = "gradcam-jax"
#: The two objects in the demo picture: espresso (967, right) and Egyptian cat (285, left).
DEMO_CLASSES = "967,285"
GUIDED = ("guided_backprop", "guided_grad_cam")
DEFAULT_METHODS = "grad_cam,guided_backprop,guided_grad_cam"
EXIT_OK, EXIT_FAILED_FILES, EXIT_USAGE = 0, 1, 2
# The zoo's models (kept here so that --help does not import JAX; a test checks it).
MODEL_NAMES = ("efficientnet_lite0",)

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

methods: any of gradcam_jax.methods (grad_cam, grad_cam_plus_plus, xgrad_cam, hires_cam,
layer_cam, eigen_cam, eigen_grad_cam, cam), plus guided_backprop and guided_grad_cam.
"""


class UsageError(Exception):
    """Bad arguments: reported with the usage line, exit status 2."""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Grad-CAM and related visual explanations for pretrained JAX image "
                    "classifiers, from the command line.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ex = sub.add_parser(
        "explain",
        help="explain a model's predictions on image files; write PNG figures and results.json",
        description="Explain a pretrained classifier's predictions on IMAGE files. Writes one PNG "
                    "per image (a row per class: the image, then one panel per method) and "
                    "results.json into --out.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("images", nargs="*", metavar="IMAGE",
                    help="image files (JPEG, PNG, ... anything Pillow reads); unreadable ones are "
                         "reported and skipped")
    ex.add_argument("--demo", action="store_true",
                    help="explain the bundled demo picture (a cat and an espresso cup side by side; "
                         f"classes {DEMO_CLASSES} unless --classes is given)")
    ex.add_argument("--model", default="efficientnet_lite0", metavar="NAME",
                    help=f"zoo model (default: %(default)s; available: {', '.join(MODEL_NAMES)})")
    ex.add_argument("--classes", default=None, metavar="SPEC",
                    help="which classes to explain per image: topK (the K most probable, default "
                         "top3) or a comma-separated list of class indices and/or exact class "
                         "names, e.g. 285,967 or 'tabby,espresso'")
    ex.add_argument("--methods", default=None, metavar="LIST",
                    help=f"comma-separated methods, one figure column each (default: {DEFAULT_METHODS}; "
                         "the guided ones only where this gradcam_jax provides them)")
    ex.add_argument("--layer", default=None, metavar="PATH",
                    help="layer to explain at, as a module path (default: the model's last "
                         "convolutional feature map, 'head' for efficientnet_lite0); see "
                         f"`{PROG} layers`")
    ex.add_argument("--out", default="gradcam-out", metavar="DIR",
                    help="output folder, created if needed (default: %(default)s)")
    ex.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                    help="images per forward pass (default: %(default)s)")
    ex.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in overlays (default: %(default)s)")
    ex.add_argument("--cmap", default="jet", help="Matplotlib colormap for heatmaps (default: %(default)s)")
    ex.add_argument("--dpi", type=_positive_int, default=150, help="figure resolution (default: %(default)s)")
    ex.add_argument("--save-maps", action="store_true",
                    help="also write each image's raw maps and class indices as NAME.npz")
    ex.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")

    explain_dir = _explain_dir_registrar()
    if explain_dir is not None:  # gradcam_jax.dataset: whole folders into a Zarr store
        explain_dir(sub)

    ly = sub.add_parser("layers", help="list a model's layer paths (for --layer)",
                        description="List the layer paths of a zoo model, in call order, with their "
                                    "output shapes for a 224 x 224 input.")
    ly.add_argument("--model", default="efficientnet_lite0", metavar="NAME",
                    help="zoo model (default: %(default)s)")
    ly.add_argument("--all", action="store_true",
                    help="include every submodule (convolutions, batch norms), not only blocks")
    return parser


def _explain_dir_registrar():
    """``gradcam_jax.dataset``'s ``add_explain_dir_command``, when that module is present."""
    try:
        from .dataset import add_explain_dir_command
    except ImportError:
        return None
    return add_explain_dir_command


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "unknown"




def parse_classes(spec: str) -> Tuple[str, object]:
    """``"top3"`` -> ``("top", 3)``; ``"285, espresso"`` -> ``("list", [285, "espresso"])``."""
    text = spec.strip()
    m = re.fullmatch(r"top[-_ ]?(\d+)", text, flags=re.IGNORECASE)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise UsageError("--classes topK needs K >= 1.")
        return "top", k
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"--classes {spec!r}: give topK or a comma-separated list of classes.")
    return "list", [int(t) if re.fullmatch(r"\d+", t) else t for t in items]


def available_methods() -> Dict[str, str]:
    """Method name -> kind (``"cam"``: heatmaps, ``"gradient"``: input gradients)."""
    import gradcam_jax as gcj

    out = {name: "cam" for name in gcj.methods.REGISTRY}
    for name in GUIDED:
        if getattr(gcj, name, None) is not None:
            out[name] = "gradient"
    return out


def parse_methods(spec: Optional[str]) -> List[str]:
    avail = available_methods()
    if spec is None:
        return [m for m in DEFAULT_METHODS.split(",") if m in avail]
    methods = [m.strip().lower().replace("-", "_") for m in spec.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods is empty.")
    unknown = [m for m in methods if m not in avail]
    if unknown:
        missing_guided = [m for m in unknown if m in GUIDED]
        hint = (" (guided_backprop / guided_grad_cam are not in this version of gradcam_jax)"
                if missing_guided else "")
        raise UsageError(f"unknown method(s) {', '.join(unknown)}{hint}; available: {', '.join(sorted(avail))}.")
    return list(dict.fromkeys(methods))


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class Progress:
    """A small stderr progress bar (``\\r``-redrawn on a terminal, plain lines otherwise)."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 3
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()

    def update(self, n: int = 1, label: str = ""):
        self.done += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 28
        fill = int(width * self.done / max(self.total, 1))
        bar = "#" * fill + "-" * (width - fill)
        text = f"[{bar}] {self.done}/{self.total} images  {elapsed:5.1f}s  eta {eta:4.0f}s"
        if self.tty:
            self.stream.write("\r" + text + (" " + label[:30] if label else "").ljust(32))
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(text + (f"  {label}" if label else "") + "\n")
        self.stream.flush()


def _say(quiet: bool, *args):
    if not quiet:
        print(*args, file=sys.stderr)


def _error(msg: str):
    print(f"{PROG}: error: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------


def _read_image(path: str):
    """The file as a uint8 RGB array, or raise ValueError with a readable reason."""
    from .dataset._sources import RecordError, load_image  # the dataset loader's decoder

    try:
        arr = load_image(path, size=None)
    except RecordError as e:
        raise ValueError(str(e)) from None
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"image is only {arr.shape[1]} x {arr.shape[0]} pixels")
    return arr


def _unique_stem(path: str, taken: set) -> str:
    stem = re.sub(r"[^\w.\-]+", "_", Path(path).stem) or "image"
    name, i = stem, 2
    while name.lower() in taken:
        name, i = f"{stem}_{i}", i + 1
    taken.add(name.lower())
    return name


def _resolve_classes(kind: str, value, model) -> Optional[List[int]]:
    if kind == "top":
        if value > len(model.class_names):
            raise UsageError(f"--classes top{value}: {model.name} has only {len(model.class_names)} classes.")
        return None
    out = []
    n = len(model.class_names)
    for item in value:
        if isinstance(item, int):
            if not 0 <= item < n:
                raise UsageError(f"--classes: class index {item} is out of range; {model.name} has {n} classes (0-{n - 1}).")
            out.append(item)
        else:
            try:
                out.append(model.class_index(item))
            except ValueError as e:
                raise UsageError(f"--classes: {e}") from None
    return out


def _explain_batch(model, tap, x, targets, methods, kinds):
    """All maps for one batch: method -> (B, K, H, W) heatmaps or (B, K, H, W, C) gradients."""
    import jax.numpy as jnp
    import numpy as np

    import gradcam_jax as gcj

    t = jnp.asarray(targets, jnp.int32)
    out = {}
    for name in methods:
        if kinds[name] == "cam":
            out[name] = np.asarray(gcj.cam(tap, x, target=t, method=name))
        else:  # guided_backprop, guided_grad_cam: (B, K, H, W, C) for (B, K) targets
            out[name] = np.asarray(getattr(gcj, name)(tap, x, target=t))
    return out


def run_explain(args) -> int:
    quiet = args.quiet
    t_start = time.perf_counter()
    paths = list(args.images)
    if args.demo:
        paths.insert(0, str(DEMO_IMAGE))
    if not paths:
        raise UsageError("no images given: pass IMAGE files, or --demo for the bundled example.")
    classes_spec = args.classes or (DEMO_CLASSES if args.demo and not args.images else "top3")
    kind, value = parse_classes(classes_spec)
    methods = parse_methods(args.methods)
    if not methods:
        raise UsageError("no methods to run.")
    if not 0.0 <= args.alpha <= 1.0:
        raise UsageError(f"--alpha must be in [0, 1]; got {args.alpha}.")
    import matplotlib

    if args.cmap not in matplotlib.colormaps:
        raise UsageError(f"--cmap {args.cmap!r} is not a Matplotlib colormap (try jet, turbo, inferno, viridis).")

    import numpy as np

    from . import viz, zoo

    try:
        model = zoo.load(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    fixed = _resolve_classes(kind, value, model)
    layer = (args.layer or model.default_layer).strip("/")
    if layer != model.default_layer and layer not in model.layers:
        shown = ", ".join(p for p in model.layers if "/" not in p)
        raise UsageError(f"--layer {layer!r} is not a layer of {model.name}. Top-level layers: {shown}. "
                         f"`{PROG} layers --all` lists every submodule.")
    tap = model.tap if layer == model.default_layer else model.tap_at(layer)
    kinds = available_methods()

    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {str(out_dir)!r}: {e.strerror or e}") from None

    k = value if kind == "top" else len(fixed)
    batch_size = min(args.batch_size, len(paths))
    progress = Progress(len(paths), enabled=not quiet)
    records: List[dict] = []
    errors: List[dict] = []
    written: List[str] = []
    taken: set = set()

    def fail(path, reason):
        errors.append({"path": path, "error": reason})
        # Drop a partial line of the progress bar before the message.
        if progress.enabled and progress.tty:
            sys.stderr.write("\n")
        _error(f"cannot read {path!r}: {reason}; skipped.")
        progress.update(1, Path(path).name)

    pending: List[Tuple[str, "np.ndarray"]] = []

    def flush():
        if not pending:
            return
        images = [im for _, im in pending]
        x = model.preprocess(images)
        n = x.shape[0]
        if n < batch_size:  # pad to a fixed batch: one compilation for the whole run
            x = np.concatenate([np.asarray(x), np.repeat(np.asarray(x[-1:]), batch_size - n, axis=0)])
        probs = np.asarray(model.probs(x))
        if fixed is None:
            targets = np.argsort(-probs, axis=-1)[:, :k]
        else:
            targets = np.broadcast_to(np.asarray(fixed, np.int64), (x.shape[0], k))
        maps = _explain_batch(model, tap, x, targets, methods, kinds)
        for i, (path, img) in enumerate(pending):
            stem = _unique_stem(path, taken)
            title = f"{Path(path).name}  ·  {_pretty_model(model.name)}  ·  layer {layer}"
            fig = viz.figure_grid(img, {m: maps[m][i] for m in methods}, targets[i],
                                  class_names=model.class_names, probs=probs[i], alpha=args.alpha,
                                  cmap=args.cmap, title=title, dpi=args.dpi)
            png = out_dir / f"{stem}.png"
            viz.save_png(fig, png)
            files = [str(png)]
            if args.save_maps:
                npz = out_dir / f"{stem}.npz"
                np.savez_compressed(npz, classes=np.asarray(targets[i]), probs=probs[i],
                                    **{m: maps[m][i] for m in methods})
                files.append(str(npz))
            written.extend(files)
            top = np.argsort(-probs[i])[:5]
            records.append({
                "path": path,
                "width": int(img.shape[1]),
                "height": int(img.shape[0]),
                "top": [_cls(model, c, probs[i]) for c in top],
                "explained": [_cls(model, c, probs[i]) for c in targets[i]],
                "files": files,
            })
            progress.update(1, Path(path).name)
        pending.clear()

    for path in paths:
        try:
            img = _read_image(path)
        except (OSError, ValueError) as e:
            fail(path, str(e))
            continue
        pending.append((path, img))
        if len(pending) == batch_size:
            flush()
    flush()

    summary = {
        "model": model.name,
        "layer": layer,
        "methods": methods,
        "method": ",".join(methods),
        "classes": classes_spec,
        "input_size": model.input_size,
        "images": records,
        "errors": errors,
        "files": written,
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    results = out_dir / "results.json"
    results.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    if not quiet:
        for rec in records:
            best = ", ".join(f"{c['name']} {100 * c['prob']:.1f}%" for c in rec["explained"])
            _say(False, f"{rec['path']}: {best} -> {rec['files'][0]}")
        _say(False, f"wrote {len(records)} figure(s) and {results} in {summary['seconds']:.1f}s"
                    + (f"; {len(errors)} file(s) could not be read" if errors else ""))
    return EXIT_FAILED_FILES if errors else EXIT_OK


def _cls(model, c, probs) -> dict:
    c = int(c)
    return {"index": c, "name": model.class_names[c], "prob": round(float(probs[c]), 6)}


def _pretty_model(name: str) -> str:
    return {"efficientnet_lite0": "EfficientNet-Lite0"}.get(name, name)


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------


def run_layers(args) -> int:
    from . import zoo

    try:
        model = zoo.load(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    shapes = _layer_shapes(model)
    print(f"# {model.name}: layer paths for --layer, with each layer's output shape (H, W, C) "
          f"for a {model.input_size} x {model.input_size} input")
    for path in model.layers:
        if not args.all and "/" in path:
            continue
        mark = "   <- default" if path == model.default_layer else ""
        print(f"{path:28s} {str(shapes.get(path, '')):22s}{mark}".rstrip())
    return EXIT_OK


def _layer_shapes(model) -> Dict[str, tuple]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    shapes: Dict[str, tuple] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and hasattr(out, "shape"):
            shapes.setdefault("/".join(context.module.path), tuple(out.shape[1:]))
        return out

    def run(variables, x):
        with nn.intercept_methods(interceptor):
            return model.module.apply(variables, x)

    jax.eval_shape(run, model.variables,
                   jax.ShapeDtypeStruct((1, model.input_size, model.input_size, 3), jnp.float32))
    return shapes


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def _enable_compilation_cache() -> None:
    """Keep XLA's compiled programs between runs (in the zoo's cache folder).

    The command compiles the same few programs every time (the model's forward pass, Grad-CAM,
    the guided transforms): JAX's persistent compilation cache turns those compilations into
    file reads on later runs. Skipped when the user configured a cache of their own (the
    ``JAX_COMPILATION_CACHE_DIR`` variable) or set ``GRADCAM_JAX_NO_XLA_CACHE=1``.
    """
    if os.environ.get("GRADCAM_JAX_NO_XLA_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    from .zoo import cache_dir

    try:
        if jax.config.jax_compilation_cache_dir:
            return
        path = cache_dir() / "xla"
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except (OSError, AttributeError):  # unwritable cache folder, or an older JAX: run without
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 some files failed, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command in ("explain", "explain-dir"):
        _enable_compilation_cache()
    if args.command not in ("explain", "layers") and callable(getattr(args, "handler", None)):
        return int(args.handler(args))  # a command registered by another module (explain-dir)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
    try:
        if args.command == "explain":
            return run_explain(args)
        return run_layers(args)
    except UsageError as e:
        sub.print_usage(sys.stderr)
        _error(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted.")
        return 130
    except BrokenPipeError:  # `gradcam-jax layers | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:  # pragma: no cover
            pass
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
