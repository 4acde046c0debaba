"""A dataset run's job, described once: :func:`build_job` checks ``explain_dataset``'s
arguments and resolves them into a frozen :class:`Job` — the model's tap and preprocessing, the
records, the methods and target, the step's static configuration, the layout over devices and
processes, and what the store holds. Building it traces the model's shapes; it computes and
writes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from .._callables import ByIdentity, KeyedFunction
from .._cam import canonical_method_name, gradient_method
from .._maps import MapOptions
from .._tap import Tap, as_tap
from . import store
from .distributed import is_main
from .plan import Plan, make_plan
from .sources import IMAGE_EXTENSIONS, RecordSpec, Source, as_source, record_spec
from .step import ComputeOptions, StepSpec, output_shapes
from .targets import Targets, resolve_targets

__all__ = [
    "Arguments",
    "Job",
    "ModelParts",
    "Methods",
    "build_job",
    "resolve_model",
    "resolve_methods",
    "to_float",
    "pretrained_preprocess",
    "say",
    "RESOLUTIONS",
]

#: ``resolution=``: maps at the tapped layer's resolution, or upsampled to the input's.
RESOLUTIONS = ("layer", "input")


def say(enabled: bool, *args) -> None:
    """Print a progress message to stderr (when ``enabled``)."""
    if enabled:
        print(*args, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True, eq=False)
class Arguments:
    """``explain_dataset``'s parameters, one field each, as given (see
    :func:`~.run.explain_dataset`, which builds this from its ``locals()``)."""

    source: Any
    model: Any
    methods: str | Sequence[str | Callable] | Callable
    target: Any
    out: str | os.PathLike
    batch_size: int
    mesh: Mesh | None
    resume: bool
    resolution: str
    size: int | None
    preprocess: Callable | None
    layer: str | None
    device_batch: int | None
    top: int
    normalize: bool
    relu: bool
    interpolation: str
    counterfactual: bool
    drop_tokens: int
    grid: tuple[int, int] | None
    layout: str | None
    workers: int | None
    worker_processes: int
    extensions: Sequence[str] | None
    progress: bool
    data_axis: str


@dataclasses.dataclass(frozen=True, eq=False)
class ModelParts:
    """The model, resolved: its tap, the preprocessing run on device, the input side (``None``:
    records are not resized), and what the store records of it."""

    tap: Tap
    preprocess: Callable
    size: int | None
    class_names: list[str] | None
    name: str | None
    layer: str | None


@dataclasses.dataclass(frozen=True)
class Methods:
    """The methods: their names (as stored), raw-map formulas, and whether maps get a method
    axis (a list of methods was given)."""

    names: tuple[str, ...]
    fns: tuple[Callable, ...]
    axis: bool


@dataclasses.dataclass(frozen=True, eq=False)
class Job:
    """Everything a run needs, resolved once (see :func:`build_job`).

    ``step`` is the jitted step's static configuration; ``map_shape`` and ``target_shape`` one
    record's maps and explained classes; ``show`` whether this process reports progress.
    """

    path: Path
    source: Source
    record: RecordSpec
    model: ModelParts
    methods: Methods
    targets: Targets
    resolution: str
    plan: Plan
    step: StepSpec
    map_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    resume: bool
    workers: int
    worker_processes: int
    show: bool

    @property
    def options(self) -> ComputeOptions:
        return self.step.compute

    def store_config(self) -> dict[str, Any]:
        """The job as the store records it; a resumed run must match it (see
        :func:`~.store.config_mismatch`)."""
        src, plan, maps = self.source, self.plan, self.options.maps
        config: dict[str, Any] = {
            "format": store.FORMAT,
            "num_records": len(src),
            "source": src.kind,
            "root": src.root,
            "files_digest": src.digest(),
            "batch_size": plan.batch_size,
            "rows": plan.rows,
            "processes": plan.blocks,
            "device_batch": plan.micro,
            "num_steps": plan.num_steps,
            "record_shape": list(self.record.shape),
            "record_dtype": str(self.record.dtype),
            "model": self.model.name,
            "layer": self.model.layer,
            "model_digest": store.digest_arrays(jax.tree_util.tree_leaves(self.model.tap)),
            "methods": list(self.methods.names),
            "method_axis": self.methods.axis,
            "target": self.targets.description,
            "target_axis": len(self.target_shape) == 1,
            "resolution": self.resolution,
            "map_shape": list(self.map_shape),
            "normalize": maps.normalize,
            "relu": maps.relu,
            "interpolation": maps.interpolation,
            "counterfactual": maps.counterfactual,
            "drop_tokens": maps.drop_tokens,
            "grid": None if maps.grid is None else list(maps.grid),
            "top": self.options.top,
            "class_names": self.model.class_names,
        }
        # Recorded only when given: a store written without layout= (or before it existed) has
        # no such key, which config_mismatch reads as None, so it resumes as it did.
        if maps.layout is not None:
            config["layout"] = maps.layout
        return config

    def store_arrays(self) -> dict[str, tuple]:
        """The store's per-record arrays (see :func:`~.store.array_layout`)."""
        return store.array_layout(
            len(self.source),
            self.plan.rows,
            self.options.top,
            self.map_shape,
            self.target_shape,
            self.methods.axis,
        )


# --------------------------------------------------------------------------------------------
# The model and the methods
# --------------------------------------------------------------------------------------------


def to_float(x: jax.Array) -> jax.Array:
    """The default preprocessing for a bare tap: integer images to float32 on the 0-255 scale."""
    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.integer) else x


def pretrained_preprocess(model: Any, size: int) -> KeyedFunction:
    """``x -> model.preprocess(x, size=size)`` (or ``model.preprocess(x)`` when it takes no
    ``size``), equal for the same model object and size (so the compiled step is reused)."""
    fn = model.preprocess
    try:
        takes_size = "size" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: call it as it is
        takes_size = False
    call = functools.partial(fn, size=size) if takes_size else fn
    return KeyedFunction(call, ("preprocess", ByIdentity(model), size if takes_size else None))


def _is_pretrained(model) -> bool:
    """A zoo model, or any model object with a ``tap`` and a ``preprocess`` (the protocol of
    ``gradcam-jax --model MODULE:FACTORY``), as opposed to a bare tap."""
    return not isinstance(model, Tap) and hasattr(model, "tap") and hasattr(model, "preprocess")


def resolve_model(model: Any, layer: str | None, preprocess: Callable | None, size: int | None) -> ModelParts:
    """A zoo model (its tap at ``layer``, preprocessing, input size, class names) or a tap."""
    if _is_pretrained(model):
        size = int(size) if size else int(getattr(model, "input_size", 224))
        return ModelParts(
            tap=as_tap(model.tap_at(layer) if layer else model.tap),
            preprocess=preprocess or pretrained_preprocess(model, size),
            size=size,
            class_names=list(getattr(model, "class_names", []) or []) or None,
            name=str(getattr(model, "name", type(model).__name__)),
            layer=layer or getattr(model, "default_layer", None),
        )
    if layer is not None:
        raise ValueError(
            "layer= picks the layer of a zoo model; for your own model build the tap "
            "at the layer you want (gcj.linen_tap(module, variables, layer=...))."
        )
    tap = as_tap(model)
    return ModelParts(tap, preprocess or to_float, int(size) if size else None, None, None, tap.name)


def _method(m: str | Callable) -> tuple[str, Callable]:
    if isinstance(m, str):
        return canonical_method_name(m), gradient_method(m)
    if callable(m):
        return getattr(m, "__name__", type(m).__name__), m
    raise TypeError(f"a method must be a registered name or a function (A, dA) -> map; got {m!r}.")


def resolve_methods(methods: str | Sequence[str | Callable] | Callable) -> Methods:
    """One method (a name or an ``(A, dA) -> map`` function) or a list of them."""
    if isinstance(methods, str) or callable(methods):
        items, axis = [methods], False
    else:
        items, axis = list(methods), True
    if not items:
        raise ValueError("methods is empty: give a method name such as 'grad_cam', or a list of them.")
    names, fns = zip(*(_method(m) for m in items), strict=True)
    if len(set(names)) != len(names):
        raise ValueError(f"methods lists a method twice: {list(names)}.")
    return Methods(tuple(names), tuple(fns), axis)


# --------------------------------------------------------------------------------------------
# The records and the shapes
# --------------------------------------------------------------------------------------------


def _resolve_source(args: Arguments, path: Path, show: bool) -> Source:
    """The records; when resuming a folder's job, the list the store holds, which is the job's
    even if the folder changed since."""
    src = as_source(args.source, args.extensions)
    existing = store.read_config(path) if args.resume else None
    if (
        existing is not None
        and src.kind == "folder"
        and existing.get("source") == "folder"
        and existing.get("files_digest") != src.digest()
    ):
        names = store.read_names(path)
        say(
            show,
            f"explain_dataset: the folder now lists {len(src)} images; continuing the job "
            f"in {path} with the {len(names)} it listed when it started.",
        )
        src = src.with_names(names)
    if len(src) == 0:
        where = f" under {src.root!r}" if src.root else ""
        raise ValueError(
            f"the source has no records{where} (image files end in "
            f"{', '.join(args.extensions or IMAGE_EXTENSIONS)})."
        )
    return src


def _fit_to_model(tap: Tap, options: ComputeOptions, targets: Targets, x_spec) -> ComputeOptions:
    """Check the targets against the model's classes; keep at most that many top classes."""
    pre = options.preprocess
    scores = jax.eval_shape(lambda tp, x: tp(pre(x))[0], tap, x_spec)
    if not (hasattr(scores, "shape") and len(scores.shape) == 2):
        return options  # not a classifier: the step says so
    num_classes = int(scores.shape[-1])
    targets.check_range(num_classes)
    return dataclasses.replace(options, top=min(options.top, num_classes))


def _check_arguments(args: Arguments) -> MapOptions:
    if args.resolution not in RESOLUTIONS:
        raise ValueError(
            f"resolution={args.resolution!r}: use 'layer' (maps at the layer's resolution) or "
            f"'input' (upsampled to the input size)."
        )
    maps = MapOptions(
        upsample=args.resolution == "input",
        normalize=args.normalize,
        relu=args.relu,
        interpolation=args.interpolation,
        counterfactual=args.counterfactual,
        drop_tokens=args.drop_tokens,
        grid=args.grid,
        layout=args.layout,
    )
    if int(args.batch_size) < 1 or int(args.top) < 1:
        raise ValueError("batch_size and top must be >= 1.")
    return maps


def build_job(args: Arguments) -> Job:
    """Check ``explain_dataset``'s arguments and describe the job (nothing computed or written)."""
    maps = _check_arguments(args)
    show = bool(args.progress) and is_main()
    model = resolve_model(args.model, args.layer, args.preprocess, args.size)
    methods = resolve_methods(args.methods)
    path = Path(os.fspath(args.out)).absolute()
    source = _resolve_source(args, path, show)
    targets = resolve_targets(args.target, len(source))
    size = 224 if model.size is None and source.kind in ("folder", "paths") else model.size
    plan = make_plan(args.mesh, args.data_axis, int(args.batch_size), args.device_batch, len(source))
    record = record_spec(source, size)

    options = ComputeOptions(
        model.preprocess, methods.fns, methods.axis, targets.kind, targets.fn, int(args.top), maps
    )
    x_spec = jax.ShapeDtypeStruct((plan.micro,) + record.shape, record.dtype)
    t_spec = jax.ShapeDtypeStruct((plan.micro,) + targets.shape, jnp.int32)
    options = _fit_to_model(model.tap, options, targets, x_spec)
    maps_out, _, _, targets_out = output_shapes(model.tap, options, x_spec, t_spec)
    step = StepSpec(plan.mesh, plan.data_axis, plan.per_device, plan.micro, options)
    workers = min(os.cpu_count() or 1, 8) if args.workers is None else int(args.workers)
    return Job(
        path=path,
        source=source,
        record=record,
        model=model,
        methods=methods,
        targets=targets,
        resolution=args.resolution,
        plan=plan,
        step=step,
        map_shape=tuple(maps_out.shape[1:]),
        target_shape=tuple(targets_out.shape[1:]),
        resume=bool(args.resume),
        workers=workers,
        worker_processes=int(args.worker_processes or 0),
        show=show,
    )
