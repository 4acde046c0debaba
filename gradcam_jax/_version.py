"""The package version, in one place: pyproject.toml reads it, ``gradcam_jax.__version__`` re-exports it."""

__version__ = "0.1.0"
