"""How a dataset run's global batches map onto devices and processes.

Every global batch of ``batch_size`` records is sharded along one axis of a
``jax.sharding.Mesh`` (by default all devices, ordered by process). Each device runs the model
on its share in micro-batches of ``micro`` records; each process feeds and writes one
contiguous *block* of ``rows`` records of every batch (the rows its devices hold).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DEFAULT_DEVICE_BATCH", "Plan", "make_plan", "default_mesh", "process_blocks", "micro_batch"]

#: Default micro-batch (records per model call per device); see ``device_batch``.
DEFAULT_DEVICE_BATCH = 8


@dataclasses.dataclass(frozen=True)
class Plan:
    """The layout of a run: ``num_steps`` global batches of ``batch_size`` records.

    Attributes:
      mesh, data_axis: the devices, and the axis the batch is sharded along.
      batch_size: records per global batch; ``per_device`` of them on each device of the axis,
        computed ``micro`` at a time.
      rows, block, blocks: this process's block of every batch (``rows`` records, the
        ``block``-th of ``blocks``).
      num_records, num_steps: the dataset's size and the number of global batches.
    """

    mesh: Mesh
    data_axis: str
    batch_size: int
    per_device: int
    micro: int
    rows: int
    block: int
    blocks: int
    num_records: int
    num_steps: int

    @property
    def sharding(self) -> NamedSharding:
        """A batch-sharded array's sharding (the batch axis along ``data_axis``)."""
        return NamedSharding(self.mesh, PartitionSpec(self.data_axis))

    @property
    def replicated(self) -> NamedSharding:
        """A replicated array's sharding (the model's parameters)."""
        return NamedSharding(self.mesh, PartitionSpec())

    def first_row(self, step: int) -> int:
        """The global index of this process's first record in batch ``step``."""
        return step * self.batch_size + self.block * self.rows

    def images(self, step: int) -> int:
        """Records of the dataset in batch ``step`` (all processes; the last batch is padded)."""
        return max(0, min(self.batch_size, self.num_records - step * self.batch_size))


def default_mesh(data_axis: str = "data") -> Mesh:
    """All devices of all processes on one axis, ordered by process (each process's devices
    then hold one contiguous block of every batch)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (data_axis,))


def micro_batch(batch_size: int, n_data: int, device_batch: int | None) -> int:
    """Records per model call on each of ``n_data`` devices: ``device_batch``, which must divide
    each device's share of ``batch_size``; by default the largest divisor of that share up to
    :data:`DEFAULT_DEVICE_BATCH`."""
    per_device = batch_size // n_data
    if device_batch is None:
        return math.gcd(per_device, DEFAULT_DEVICE_BATCH)
    micro = int(device_batch)
    if micro < 1 or per_device % micro:
        raise ValueError(
            f"device_batch={micro} must divide each device's share of the batch "
            f"({batch_size} / {n_data} devices = {per_device}); use a batch_size that is a "
            f"multiple of {n_data * micro}."
        )
    return micro


def _process_spans(sharding: NamedSharding, batch: int) -> dict[int, tuple[int, int]]:
    """``process -> (first row, end)`` of the batch; raises unless each span is contiguous."""
    per_process: dict[int, set[int]] = {}
    index_map: dict[Any, tuple] = dict(sharding.devices_indices_map((batch,)))
    for dev, idx in index_map.items():
        start, stop, _ = idx[0].indices(batch)
        per_process.setdefault(dev.process_index, set()).update(range(start, stop))
    spans = {}
    for p, rows in per_process.items():
        lo, hi = min(rows), max(rows) + 1
        if len(rows) != hi - lo:
            raise ValueError(
                f"process {p} holds non-contiguous rows of the batch under this mesh; "
                f"order the mesh's devices by process (the default mesh does)."
            )
        spans[p] = (lo, hi)
    return spans


def process_blocks(sharding: NamedSharding, batch: int) -> tuple[int, int, int]:
    """-> (rows per process, this process's block index, number of blocks).

    Every process must hold one contiguous, equally sized slice of the batch axis.
    """
    spans = _process_spans(sharding, batch)
    sizes = {hi - lo for lo, hi in spans.values()}
    starts = sorted(lo for lo, _ in spans.values())
    if len(sizes) != 1:
        raise ValueError(
            f"processes hold different numbers of rows of each batch ({spans}); use the "
            f"same number of devices on every host."
        )
    rows = sizes.pop()
    if starts != [i * rows for i in range(len(spans))]:
        raise ValueError(
            f"the processes' slices of the batch overlap ({spans}): each process must "
            f"hold a distinct slice of the '{sharding.spec[0]}' axis."
        )
    lo, _ = spans[jax.process_index()]
    return rows, lo // rows, len(spans)


def make_plan(
    mesh: Mesh | None, data_axis: str, batch_size: int, device_batch: int | None, num_records: int
) -> Plan:
    """Check the mesh and batch sizes against each other and lay the run out (``mesh=None``:
    :func:`default_mesh`)."""
    mesh = mesh if mesh is not None else default_mesh(data_axis)
    if data_axis not in mesh.axis_names:
        raise ValueError(
            f"the mesh has axes {mesh.axis_names}; the batch is sharded along "
            f"data_axis={data_axis!r}, which it lacks."
        )
    n_data = int(mesh.shape[data_axis])
    if batch_size % n_data:
        raise ValueError(
            f"batch_size={batch_size} does not split over the {n_data} devices of the mesh's "
            f"'{data_axis}' axis; use a multiple of {n_data}."
        )
    micro = micro_batch(batch_size, n_data, device_batch)
    rows, block, blocks = process_blocks(NamedSharding(mesh, PartitionSpec(data_axis)), batch_size)
    return Plan(
        mesh,
        data_axis,
        batch_size,
        batch_size // n_data,
        micro,
        rows,
        block,
        blocks,
        num_records,
        -(-num_records // batch_size),
    )
