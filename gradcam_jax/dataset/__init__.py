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
and :mod:`gradcam_jax.dataset.store` for the store's layout.

Modules: :mod:`.run` (``explain_dataset``, which orchestrates), :mod:`.job` (the job, described
once), :mod:`.sources` (records and the Grain loader), :mod:`.targets`, :mod:`.plan` (devices
and processes), :mod:`.step` (the jitted step), :mod:`.loop` (the batches), :mod:`.writer`,
:mod:`.distributed` and :mod:`.store` (the Zarr layout and commit markers).
"""

from .run import DatasetRun as DatasetRun
from .run import explain_dataset as explain_dataset
from .sources import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
from .sources import RecordError as RecordError
from .sources import list_images as list_images
from .sources import load_image as load_image
from .store import Results as Results
from .store import open_results as open_results

__all__ = [
    "explain_dataset",
    "open_results",
    "Results",
    "DatasetRun",
    "list_images",
    "load_image",
    "RecordError",
    "IMAGE_EXTENSIONS",
]
