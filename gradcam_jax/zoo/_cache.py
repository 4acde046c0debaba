"""Where converted weights are kept between sessions: one ``.npz`` per checkpoint and conversion."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cache_dir", "file_digest", "save_variables", "load_variables"]


def cache_dir() -> Path:
    """Where converted weights are kept: ``$GRADCAM_JAX_CACHE``, else
    ``$XDG_CACHE_HOME/gradcam_jax``, else ``~/.cache/gradcam_jax``."""
    env = os.environ.get("GRADCAM_JAX_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradcam_jax"


def file_digest(path: str | os.PathLike, n: int = 16) -> str:
    """The first ``n`` hex digits of the file's SHA-256 (the cache key of a checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = np.asarray(v)
    return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def save_variables(path: Path, variables: dict) -> bool:
    """Write variables to ``path`` (an ``.npz``) atomically. False when that is not possible
    (a read-only or full disk): the caller then simply goes on without a cache."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        arrays: dict[str, Any] = _flatten(variables)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False


def load_variables(path: Path) -> dict | None:
    """Variables saved by :func:`save_variables`, or None when missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return _unflatten({k: z[k] for k in z.files})
    except Exception:  # a damaged cache file (bad zip, truncated array ...): rebuild it
        return None
