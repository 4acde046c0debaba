"""Explain a whole dataset on every device of every host, into a resumable Zarr store.

>>> import gradcam_jax as gcj
>>> from gradcam_jax import zoo
>>> from gradcam_jax.dataset import explain_dataset, open_results
>>> run = explain_dataset("photos/", zoo.efficientnet_lite0(), out="maps.zarr")   # doctest: +SKIP
>>> res = open_results("maps.zarr")                                              # doctest: +SKIP
>>> res["maps"].shape, res["classes"][:2], res.failures()                        # doctest: +SKIP

From the shell: ``gradcam-jax explain-dir photos/ --out maps.zarr`` (or
``python -m gradcam_jax.dataset photos/ --out maps.zarr``). Kill it at any moment and run the
same command again: it continues where it stopped, and the final store is byte-for-byte what an
uninterrupted run writes. See :func:`explain_dataset` for the multi-device / multi-host model
and :mod:`gradcam_jax.dataset._store` for the store's layout.
"""

from ._run import DatasetRun, explain_dataset
from ._sources import IMAGE_EXTENSIONS, RecordError, list_images, load_image
from ._store import Results, open_results
from ._cli import add_explain_dir_command, main, run_explain_dir

__all__ = ["explain_dataset", "open_results", "Results", "DatasetRun", "list_images", "load_image",
           "RecordError", "IMAGE_EXTENSIONS", "add_explain_dir_command", "run_explain_dir", "main"]
