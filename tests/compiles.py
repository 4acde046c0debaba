"""Counting in tests: XLA compilations, from JAX's own log (``jax.log_compiles``), and the calls
of the host chunk loop's chunk kernel."""

import contextlib
import logging

import jax

from gradcam_jax import _chunking as chunking


@contextlib.contextmanager
def compilations(caplog, name):
    """Collects the names of the ``name`` programs XLA compiles inside the block (a list filled
    on exit); ``caplog`` is pytest's fixture."""
    found: list[str] = []
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        start = len(caplog.records)
        yield found
        found.extend(
            m
            for m in (r.getMessage() for r in caplog.records[start:])
            if m.startswith(f"Compiling jit({name})")
        )


def counted_chunks(monkeypatch):
    """A list that gets, per call of the host loop's chunk kernel (``_chunking.chunk_kernel``),
    the :class:`~gradcam_jax._chunking.Stages` it ran."""
    calls: list = []
    chunk = chunking.chunk_kernel

    def counted(*a, **k):
        calls.append(k["plan"].stages)
        return chunk(*a, **k)

    monkeypatch.setattr(chunking, "chunk_kernel", counted)
    return calls
