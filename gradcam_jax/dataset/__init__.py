"""Explain a whole dataset on every device of every host, into a resumable Zarr store.

>>> import os, jax, numpy as np, gradcam_jax as gcj
>>> from PIL import Image
>>> from gradcam_jax.dataset import explain_dataset, open_results
>>> os.makedirs("photos", exist_ok=True)
>>> for i in range(3):  # three small pictures; any folder of images works
...     Image.fromarray(np.full((32, 32, 3), 80 * i, np.uint8)).save(f"photos/{i}.png")
>>> w = jax.random.normal(jax.random.key(0), (3, 4))
>>> tap = gcj.split_tap(lambda x: jax.nn.relu(x[:, ::4, ::4] - 0.2), lambda a: a.mean(axis=(1, 2)) @ w)
>>> run = explain_dataset("photos/", tap, out="maps.zarr", size=32, batch_size=2, progress=False)
>>> res = open_results("maps.zarr")
>>> res["maps"].shape, res["classes"].shape, res.failures()
((3, 8, 8), (3, 4), [])

With a pretrained model: ``explain_dataset("photos/", gcj.zoo.efficientnet_lite0(), out=...)``.

From the shell: ``gradcam-jax explain-dir photos/ --out maps.zarr`` (or
``python -m gradcam_jax.dataset photos/ --out maps.zarr``). Kill it at any moment and run the
same command again: it continues where it stopped, and the final store is byte-for-byte what an
uninterrupted run writes. See :func:`explain_dataset` for the multi-device / multi-host model
and :mod:`gradcam_jax.dataset.store` for the store's layout.

One run writes a store at a time: it holds the lock file ``STORE.lock`` next to the store, and
a second run on it is refused (:class:`StoreLocked`) before anything is touched.

Modules: :mod:`.run` (``explain_dataset``, which orchestrates), :mod:`.job` (the job, described
once), :mod:`.images` (the image decoder), :mod:`.sources` (records and the Grain loader),
:mod:`.targets`, :mod:`.plan` (devices and processes), :mod:`.step` (the jitted step),
:mod:`.loop` (the batches), :mod:`.writer`, :mod:`.distributed`, :mod:`.lock` (one run per
store; the output's errors), :mod:`.store` (the Zarr layout and commit markers) and
:mod:`.results` (reading a store).
"""

from .images import RecordError as RecordError
from .images import load_image as load_image
from .lock import NotAStore as NotAStore
from .lock import OtherJob as OtherJob
from .lock import OutputError as OutputError
from .lock import OutputNotWritable as OutputNotWritable
from .lock import StoreLocked as StoreLocked
from .results import Results as Results
from .results import open_results as open_results
from .run import DatasetRun as DatasetRun
from .run import explain_dataset as explain_dataset
from .sources import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
from .sources import list_images as list_images

__all__ = [
    "explain_dataset",
    "open_results",
    "Results",
    "DatasetRun",
    "list_images",
    "load_image",
    "RecordError",
    "IMAGE_EXTENSIONS",
    "OutputError",
    "OutputNotWritable",
    "NotAStore",
    "OtherJob",
    "StoreLocked",
]
