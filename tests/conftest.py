import atexit
import os
import shutil
import tempfile

# Tests run on the CPU, deterministically, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# One persistent XLA compilation cache per test run, shared with the processes the tests start
# (the docs build and its notebooks, the README's and the docs pages' code, the command line):
# they compile the same zoo-model programs, which then compile once per run instead of once per
# process (three docs pages' code: 67 s with an empty cache, 30 s with a filled one). Empty at
# the start of every run and removed at its end, so no test depends on an earlier run; a cache
# the caller set is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _xla_cache = tempfile.mkdtemp(prefix="gradcam-jax-tests-xla-")
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# Eager and compiled paths both run (the explainers jit internally; an outer jit must agree).
JIT_OR_NOT = pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])
