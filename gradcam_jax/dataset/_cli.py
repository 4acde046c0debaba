"""The ``explain-dir`` command: ``gradcam-jax explain-dir DIR --out STORE [...]``.

Also runnable as ``python -m gradcam_jax.dataset DIR --out STORE [...]``. To register it in
another ``argparse`` command line: ``add_explain_dir_command(subparsers)`` adds the sub-command
and sets ``handler=run_explain_dir`` on its parsed arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from .._argtypes import nonnegative_int as _nonnegative_int
from .._argtypes import positive_int as _positive_int
from ..cli import UsageError as _UsageError
from ..cli import parse_classes

__all__ = ["add_explain_dir_command", "run_explain_dir", "build_parser", "main"]

PROG = "gradcam-jax explain-dir"
EXIT_OK, EXIT_FAILED_FILES, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Explain every image under DIR (recursively) with a pretrained classifier and write the maps,
the predicted classes and probabilities, the file list and the unreadable files into a Zarr
store. Uses every device JAX sees (and every host, with --distributed). Resumable: kill it at
any moment and run the same command again; it continues where it stopped and the final store
is identical to an uninterrupted run's. Running a finished job again does nothing."""

EPILOG = """\
examples:
  gradcam-jax explain-dir photos/ --out photos.zarr
      Grad-CAM of each image's top class at EfficientNet-Lite0's last feature map (7 x 7)
  gradcam-jax explain-dir photos/ --out photos.zarr --classes top3 --resolution input \\
        --methods grad_cam,grad_cam_plus_plus
      three classes per image, two methods, maps upsampled to 224 x 224
  python -c "import gradcam_jax as g; r = g.open_results('photos.zarr'); print(r['maps'].shape)"

several hosts (the same command on each; --out on a shared file system):
  gradcam-jax explain-dir /data/imgs --out /shared/imgs.zarr --distributed
      jax.distributed.initialize() finds the cluster itself on Cloud TPU, Slurm and Open MPI;
      elsewhere add --coordinator-address HOST:PORT --num-processes N --process-id I

exit status: 0 all images explained, 1 some files could not be read (recorded in the store's
'errors' and skipped), 2 bad arguments.
"""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="folder of images, read recursively in sorted order")
    p.add_argument("--out", required=True, metavar="STORE",
                   help="the Zarr store to write (a folder; continued if it holds this job)")
    p.add_argument("--model", default="efficientnet_lite0", metavar="NAME",
                   help="a zoo model (default: %(default)s) or MODULE:FUNCTION returning a zoo-style "
                        "model (with .tap, .preprocess, .input_size) or a tap")
    p.add_argument("--layer", default=None, metavar="PATH",
                   help="layer to explain at (default: the model's last feature map); see "
                        "`gradcam-jax layers`")
    p.add_argument("--methods", default="grad_cam", metavar="LIST",
                   help="comma-separated CAM methods (default: %(default)s). More than one adds a "
                        "method axis to maps")
    p.add_argument("--classes", default="top1", metavar="SPEC",
                   help="classes explained per image: top1 (default: each image's predicted class), "
                        "topK (the K most probable), or a comma-separated list of class indices or "
                        "exact names (adds a target axis to maps)")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                   help="images per step over all devices and hosts (default: %(default)s)")
    p.add_argument("--device-batch", type=_positive_int, default=None, metavar="N",
                   help="images per model call on each device (default 8; raise on GPUs/TPUs). "
                        "The store depends on it, never on the device count")
    p.add_argument("--size", type=_positive_int, default=None, metavar="PX",
                   help="side images are resized to (default: the model's input size)")
    p.add_argument("--resolution", choices=("layer", "input"), default="layer",
                   help="maps at the layer's resolution (default) or upsampled to the input size")
    p.add_argument("--top", type=_positive_int, default=5, metavar="K",
                   help="most probable classes (and probabilities) kept per image (default: %(default)s)")
    p.add_argument("--workers", type=_nonnegative_int, default=None, metavar="N",
                   help="loader threads decoding images (default: CPU count, at most 8)")
    p.add_argument("--worker-processes", type=_nonnegative_int, default=0, metavar="N",
                   help="Grain loader processes on top of the threads (default: 0)")
    p.add_argument("--no-resume", action="store_true",
                   help="delete an existing store of this job and start over")
    dist = p.add_argument_group("several hosts (jax.distributed.initialize)")
    dist.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() before anything else; alone it "
                           "auto-detects Cloud TPU, Slurm and Open MPI clusters")
    dist.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                      help="process 0's address and a free port (implies --distributed)")
    dist.add_argument("--num-processes", type=_positive_int, default=None, metavar="N")
    dist.add_argument("--process-id", type=_nonnegative_int, default=None, metavar="I")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")


def add_explain_dir_command(subparsers) -> argparse.ArgumentParser:
    """Add ``explain-dir`` to an ``argparse`` sub-command group; ``args.handler(args)`` runs it."""
    p = subparsers.add_parser(
        "explain-dir", help="explain every image of a folder into a resumable Zarr store (all devices, all hosts)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(handler=run_explain_dir, command="explain-dir")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gradcam_jax.dataset", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(handler=run_explain_dir)
    return p


# --------------------------------------------------------------------------------------------


def _load_model(spec: str, layer: Optional[str]):
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            if mod_name.endswith(".py") or os.sep in mod_name:
                import importlib.util

                spec_ = importlib.util.spec_from_file_location(os.path.basename(mod_name)[:-3], mod_name)
                if spec_ is None or spec_.loader is None:
                    raise ImportError(f"cannot load {mod_name}")
                mod = importlib.util.module_from_spec(spec_)
                spec_.loader.exec_module(mod)
            else:
                mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise _UsageError(f"--model {spec!r}: cannot import {mod_name!r} ({e}).") from None
        fn = getattr(mod, attr, None)
        if fn is None:
            raise _UsageError(f"--model {spec!r}: {mod_name!r} has no {attr!r}.")
        if not callable(fn):
            raise _UsageError(f"--model {spec!r}: {attr!r} is not a function returning a model.")
        return fn()
    from .. import zoo

    try:
        return zoo.load(spec)
    except ValueError as e:
        raise _UsageError(f"--model: {e}") from None


def _parse_classes(spec: str, model):
    kind, value = parse_classes(spec)  # the explain command's syntax: topK or indices/names
    if kind == "top":
        return None if value == 1 else f"top{value}"
    names = list(getattr(model, "class_names", []) or [])
    out: List[int] = []
    for item in value:
        if isinstance(item, int):
            if names and not 0 <= item < len(names):
                raise _UsageError(f"--classes: class {item} is out of range; the model has {len(names)} classes.")
            out.append(item)
        elif hasattr(model, "class_index"):
            try:
                out.append(model.class_index(item))
            except ValueError as e:
                raise _UsageError(f"--classes: {e}") from None
        else:
            raise _UsageError(f"--classes: {item!r} is not a class index (this model has no class names).")
    return out


def _initialize_distributed(args) -> None:
    if not (args.distributed or args.coordinator_address or args.num_processes or args.process_id is not None):
        return
    import jax

    kwargs = {}
    if args.coordinator_address:
        kwargs["coordinator_address"] = args.coordinator_address
    if args.num_processes is not None:
        kwargs["num_processes"] = args.num_processes
    if args.process_id is not None:
        kwargs["process_id"] = args.process_id
    jax.distributed.initialize(**kwargs)


def run_explain_dir(args) -> int:
    """Run ``explain-dir`` for parsed ``args``; returns the exit status (0, 1 unreadable files, 2 usage)."""
    try:
        if not os.path.isdir(args.dir):
            raise _UsageError(f"{args.dir!r} is not a folder.")
        # Before anything touches a JAX backend: the distributed runtime must come first.
        _initialize_distributed(args)
        model = _load_model(args.model, args.layer)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            raise _UsageError("--methods is empty.")
        from .. import methods as _methods

        unknown = [m for m in methods if m.lower().replace("-", "_") not in _methods.REGISTRY]
        if unknown:
            raise _UsageError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(_methods.REGISTRY))}.")
        target = _parse_classes(args.classes, model)
        if args.layer and hasattr(model, "layers") and args.layer.strip("/") not in model.layers:
            shown = ", ".join(p for p in model.layers if "/" not in p)
            raise _UsageError(f"--layer {args.layer!r} is not a layer of the model. Top-level layers: {shown}.")
        from ._run import explain_dataset

        is_zoo_like = hasattr(model, "tap") and hasattr(model, "preprocess") and hasattr(model, "module")
        if args.layer and not is_zoo_like:
            raise _UsageError("--layer applies to zoo-style models; this --model returned a tap (its layer is fixed).")
        run = explain_dataset(
            args.dir, model, methods=methods[0] if len(methods) == 1 else methods, target=target,
            out=args.out, batch_size=args.batch_size, resume=not args.no_resume,
            resolution=args.resolution, size=args.size, layer=(args.layer.strip("/") if args.layer else None),
            device_batch=args.device_batch, top=args.top, workers=args.workers,
            worker_processes=args.worker_processes, progress=not args.quiet)
    except _UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to continue.", file=sys.stderr)
        return 130
    return EXIT_FAILED_FILES if run.unreadable else EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m gradcam_jax.dataset DIR --out STORE [...]``."""
    args = build_parser().parse_args(argv)
    return args.handler(args)
