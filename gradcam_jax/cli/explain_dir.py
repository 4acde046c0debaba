"""The ``explain-dir`` command: ``gradcam-jax explain-dir DIR --out STORE [...]``.

Also runnable as ``python -m gradcam_jax.dataset DIR --out STORE [...]`` (:func:`main`). It
checks its arguments and hands them to :func:`gradcam_jax.dataset.explain_dataset`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax

from .. import zoo
from .._cam import method_names
from ..dataset import OutputError, explain_dataset
from ..dataset.distributed import is_main
from ..dataset.store import claim
from .common import (
    EXIT_FAILED_FILES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    PROG,
    UsageError,
    error,
    nonnegative_int,
    parse_classes,
    parse_methods,
    positive_int,
)
from .models import UserModel, layer_tap, load_model

__all__ = ["add_parser", "build_parser", "run", "main", "load_model"]

EXPLAIN_DIR_PROG = f"{PROG} explain-dir"

DESCRIPTION = """\
Explain every image under DIR (recursively) with a pretrained classifier and write the maps,
the predicted classes and probabilities, the file list and the unreadable files into a Zarr
store. Uses every device JAX sees (and every host, with --distributed). Resumable: kill it at
any moment and run the same command again; it continues where it stopped and the final store
is identical to an uninterrupted run's. Running a finished job again does nothing.

One run per store: a run holds the lock file STORE.lock next to the store, and a second run on
it (same settings or not) is refused with exit status 3, naming the process that holds it,
before anything is touched. A lock left by a killed run on this host is taken over with a
notice; one left by another host is refused with the command to remove it. --out must be a new
folder, an empty one (kept), or a store; anything else is refused and left as it is."""

EPILOG = f"""\
examples:
  {EXPLAIN_DIR_PROG} photos/ --out photos.zarr
      Grad-CAM of each image's top class at EfficientNet-Lite0's last feature map (7 x 7)
  {EXPLAIN_DIR_PROG} photos/ --out photos.zarr --classes top3 --resolution input \\
        --methods grad_cam,grad_cam_plus_plus
      three classes per image, two methods, maps upsampled to 224 x 224
  python -c "import gradcam_jax as g; r = g.open_results('photos.zarr'); print(r['maps'].shape)"

several hosts (the same command on each; --out on a shared file system):
  {EXPLAIN_DIR_PROG} /data/imgs --out /shared/imgs.zarr --distributed
      jax.distributed.initialize() finds the cluster itself on Cloud TPU, Slurm and Open MPI;
      elsewhere add --coordinator-address HOST:PORT --num-processes N --process-id I

{EXIT_STATUS_HELP}"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments, for ``gradcam-jax explain-dir`` and ``python -m gradcam_jax.dataset``."""
    _add_job_arguments(p)
    _add_runner_arguments(p)
    _add_distributed_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    """What to explain, with what, into which store."""
    p.add_argument("dir", metavar="DIR", help="folder of images, read recursively in sorted order")
    p.add_argument(
        "--out",
        required=True,
        metavar="STORE",
        help="the Zarr store to write (a folder; continued if it holds this job)",
    )
    p.add_argument(
        "--model",
        default="efficientnet_lite0",
        metavar="NAME|MODULE:FACTORY",
        help="a zoo model (default: %(default)s), or MODULE:FACTORY / FILE.py:FACTORY: a function "
        "called with no arguments returning your own model (preprocess, tap, logits, class_names, "
        "optionally tap_at, layers, input_size, name: see gradcam_jax.cli.models.ExplainableModel; "
        "its preprocess must be traceable) or a bare tap",
    )
    p.add_argument(
        "--layer",
        default=None,
        metavar="PATH",
        help=f"layer to explain at (default: the model's last feature map); see `{PROG} layers`",
    )
    p.add_argument(
        "--methods",
        default="grad_cam",
        metavar="LIST",
        help="comma-separated CAM methods (default: %(default)s). More than one adds a method axis to maps",
    )
    p.add_argument(
        "--classes",
        default="top1",
        metavar="SPEC",
        help="classes explained per image: top1 (default: each image's predicted class), "
        "topK (the K most probable), or a comma-separated list of class indices or "
        "exact names (adds a target axis to maps)",
    )


def _add_runner_arguments(p: argparse.ArgumentParser) -> None:
    """How the run goes: batches, loader, resuming (none of them changes the maps but --device-batch)."""
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        metavar="N",
        help="images per step over all devices and hosts (default: %(default)s)",
    )
    p.add_argument(
        "--device-batch",
        type=positive_int,
        default=None,
        metavar="N",
        help="images per model call on each device (default 8; raise on GPUs/TPUs). "
        "The store depends on it, never on the device count",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        default=None,
        metavar="PX",
        help="side images are resized to (default: the model's input size)",
    )
    p.add_argument(
        "--layout",
        type=str.upper,
        choices=("NHWC", "NCHW"),
        default=None,
        help="the layout of the model's input after its preprocess: NHWC (channels-last, the "
        "default) or NCHW (channels-first, e.g. Hugging Face pixel_values); without it a "
        "channels-first input is refused when maps are upsampled (--resolution input)",
    )
    p.add_argument(
        "--drop-tokens",
        type=nonnegative_int,
        default=0,
        metavar="N",
        help="for a transformer layer's tokens (B, N, C): leading tokens to drop before the "
        "patch grid (1 for a ViT's class token; default: %(default)s)",
    )
    p.add_argument(
        "--resolution",
        choices=("layer", "input"),
        default="layer",
        help="maps at the layer's resolution (default) or upsampled to the input size",
    )
    p.add_argument(
        "--top",
        type=positive_int,
        default=5,
        metavar="K",
        help="most probable classes (and probabilities) kept per image (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=nonnegative_int,
        default=None,
        metavar="N",
        help="loader threads decoding images (default: CPU count, at most 8)",
    )
    p.add_argument(
        "--worker-processes",
        type=nonnegative_int,
        default=0,
        metavar="N",
        help="Grain loader processes on top of the threads (default: 0)",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="delete the contents of an existing store and start over (never a store another run "
        "holds, never a folder that is not a store)",
    )


def _add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """Several hosts: the arguments of ``jax.distributed.initialize``."""
    dist = p.add_argument_group("several hosts (jax.distributed.initialize)")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() before anything else; alone it "
        "auto-detects Cloud TPU, Slurm and Open MPI clusters",
    )
    dist.add_argument(
        "--coordinator-address",
        default=None,
        metavar="HOST:PORT",
        help="process 0's address and a free port (implies --distributed)",
    )
    dist.add_argument("--num-processes", type=positive_int, default=None, metavar="N")
    dist.add_argument("--process-id", type=nonnegative_int, default=None, metavar="I")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``explain-dir`` to the command's sub-commands; its parsed arguments carry ``func=run``."""
    p = subparsers.add_parser(
        "explain-dir",
        help="explain every image of a folder into a resumable Zarr store (all devices, all hosts)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m gradcam_jax.dataset``: the same arguments as ``explain-dir``."""
    p = argparse.ArgumentParser(
        prog="python -m gradcam_jax.dataset",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradcam_jax.dataset DIR --out STORE [...]``; returns the exit status."""
    return run(build_parser().parse_args(argv))


# --------------------------------------------------------------------------------------------
# Arguments -> explain_dataset
# --------------------------------------------------------------------------------------------


def _target(spec: str, model) -> str | list[int] | None:
    """``--classes`` as :func:`explain_dataset`'s ``target``."""
    classes = parse_classes(spec)  # the explain command's syntax: topK or indices/names
    if isinstance(classes, int):
        return None if classes == 1 else f"top{classes}"
    names = list(getattr(model, "class_names", []) or [])
    out: list[int] = []
    for item in classes:
        if isinstance(item, int):
            if item < 0 or (names and item >= len(names)):
                count = f"; the model has {len(names)} classes" if names else ""
                raise UsageError(f"--classes: class {item} is out of range{count}.")
            out.append(item)
        elif hasattr(model, "class_index"):
            try:
                out.append(model.class_index(item))
            except ValueError as e:
                raise UsageError(f"--classes: {e}") from None
        else:
            raise UsageError(f"--classes: {item!r} is not a class index (this model has no class names).")
    return out


def _initialize_distributed(args: argparse.Namespace) -> None:
    given = {
        "coordinator_address": args.coordinator_address,
        "num_processes": args.num_processes,
        "process_id": args.process_id,
    }
    given = {k: v for k, v in given.items() if v is not None and v != ""}
    if args.distributed or given:
        jax.distributed.initialize(**given)


def _model_arguments(model: Any, layer: str | None, size: int | None) -> dict[str, Any]:
    """``explain_dataset``'s ``model`` (with ``layer``, or ``preprocess``, and ``size``) for ``--model``."""
    if isinstance(model, UserModel):  # your own model: its tap at the layer, preprocessing, class names
        name = layer_tap(model, layer)[0] if layer else None  # checks the layer
        return dict(model=model, layer=name, size=size or model.input_size)
    if isinstance(model, zoo.Pretrained):
        name = layer_tap(model, layer)[0] if layer else None  # checks the layer
        return dict(model=model, layer=name, size=size)
    if layer:
        raise UsageError(
            "--layer needs a model with tap_at(layer); this --model returned a tap (its layer is fixed)."
        )
    return dict(model=model, size=size)


def _explain_dataset_arguments(args: argparse.Namespace) -> dict:
    """Check ``args`` (a :class:`UsageError` names the first problem) into explain_dataset's keywords."""
    model = load_model(args.model, taps=True)
    methods = parse_methods(args.methods, method_names("gradient"))
    target = _target(args.classes, model)
    model_arguments = _model_arguments(model, args.layer, args.size)
    return dict(
        source=args.dir,
        **model_arguments,
        methods=methods[0] if len(methods) == 1 else methods,
        target=target,
        out=args.out,
        batch_size=args.batch_size,
        resume=not args.no_resume,
        resolution=args.resolution,
        layout=args.layout,
        drop_tokens=args.drop_tokens,
        device_batch=args.device_batch,
        top=args.top,
        workers=args.workers,
        worker_processes=args.worker_processes,
        progress=not args.quiet,
    )


def _explain(args: argparse.Namespace):
    """Check ``args``, claim the store (process 0), then load the model and run."""
    if not os.path.isdir(args.dir):
        raise UsageError(f"{args.dir!r} is not a folder.")
    # Before anything touches a JAX backend: the distributed runtime must come first.
    _initialize_distributed(args)
    # The store's lock and an output check before the model is loaded: a locked, unwritable or
    # foreign --out is refused at once (explain_dataset takes the same lock again, nested).
    with claim(args.out) if is_main() else contextlib.nullcontext():
        return explain_dataset(**_explain_dataset_arguments(args))


def run(args: argparse.Namespace) -> int:
    """Run ``explain-dir`` for parsed ``args``: 0, 1 (unreadable files, recorded), 2 (bad
    arguments), 3 (the output cannot be used: see :mod:`.common`), 130 (interrupted)."""
    try:
        done = _explain(args)
    except OutputError as e:  # before ValueError: a store of another job is one
        error(str(e), prog=EXPLAIN_DIR_PROG)
        return EXIT_OUTPUT
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        error(str(e), prog=EXPLAIN_DIR_PROG)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{EXPLAIN_DIR_PROG}: interrupted; run the same command again to continue.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED_FILES if done.unreadable else EXIT_OK
