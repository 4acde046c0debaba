"""The linter, the formatter and the type checker pass, with the configuration in pyproject.toml.

Each runs from the repository root with this interpreter's installation (``python -m ruff``,
``python -m mypy``), so the versions are the ones the ``test`` extra pins.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECKS = {
    "ruff-check": ["ruff", "check", "--output-format=concise", "."],
    "ruff-format": ["ruff", "format", "--check", "."],
    # The files to check (gradcam_jax/) and the options come from [tool.mypy].
    "mypy": ["mypy"],
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_passes(name):
    result = subprocess.run(
        [sys.executable, "-m", *CHECKS[name]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        pytest.fail(f"`{' '.join(CHECKS[name])}` exited with {result.returncode}:\n{output}", pytrace=False)
