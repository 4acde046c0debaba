"""Counting XLA compilations in tests, from JAX's own log (``jax.log_compiles``)."""

import contextlib
import logging

import jax


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
