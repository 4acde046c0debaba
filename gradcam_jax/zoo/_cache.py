"""Where converted weights are kept between sessions: one ``.npz`` per checkpoint and conversion,
and next to it a manifest (``NAME.manifest.json``: every array's name, shape, dtype and SHA-256).

A cache is used only when it matches its manifest exactly (no array missing, none extra, none
altered); otherwise :func:`read_variables` says why and the caller rebuilds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cache_dir", "file_digest", "manifest_path", "save_variables", "read_variables", "load_variables"]

MANIFEST_FORMAT = "gradcam_jax.weights/1"


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


def manifest_path(path: Path) -> Path:
    """The manifest of the cache file ``path`` (``X.npz`` -> ``X.manifest.json``)."""
    return path.with_name(path.stem + ".manifest.json")


def _array_record(a: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(a)
    return {
        "shape": list(data.shape),
        "dtype": data.dtype.str,
        "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
    }


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_variables(path: Path, variables: dict) -> bool:
    """Write variables to ``path`` (an ``.npz``) and its manifest, each atomically. False when
    that is not possible (a read-only or full disk): the caller then goes on without a cache."""
    arrays: dict[str, Any] = _flatten(variables)
    manifest = {"format": MANIFEST_FORMAT, "arrays": {k: _array_record(v) for k, v in sorted(arrays.items())}}
    text = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, lambda f: np.savez(f, **arrays))
        _write_atomic(manifest_path(path), lambda f: f.write(text))
        return True
    except OSError:
        return False


def _mismatch(arrays: dict[str, np.ndarray], manifest: Any) -> str:
    """Why ``arrays`` do not match ``manifest`` ("" when they do)."""
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return "has a manifest of another format"
    expected = manifest.get("arrays")
    if not isinstance(expected, dict):
        return "has a damaged manifest"
    missing = sorted(set(expected) - set(arrays))
    if missing:
        return f"lacks the array {missing[0]!r}" + (
            f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        )
    extra = sorted(set(arrays) - set(expected))
    if extra:
        return f"has an unexpected array {extra[0]!r}"
    for name in sorted(arrays):
        if _array_record(arrays[name]) != expected[name]:
            return f"has an altered array {name!r} (its shape, dtype or contents differ from the manifest)"
    return ""


def read_variables(path: Path) -> tuple[dict | None, str]:
    """``(variables, "")`` for a cache that matches its manifest; ``(None, "")`` when there is no
    cache; ``(None, why)`` for one that cannot be used (damaged, no manifest, altered)."""
    if not path.is_file():
        return None, ""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # a damaged cache file (bad zip, truncated array ...): rebuild it
        return None, f"is damaged ({type(e).__name__})"
    try:
        manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "has no manifest (written by an older version)"
    except (OSError, ValueError):
        return None, "has a damaged manifest"
    why = _mismatch(arrays, manifest)
    return (None, why) if why else (_unflatten(arrays), "")


def load_variables(path: Path) -> dict | None:
    """Variables saved by :func:`save_variables`, or None when missing or not matching their
    manifest."""
    return read_variables(path)[0]
