"""Helper for tests/test_dataset.py: one explain_dataset run in a fresh process.

    python tests/dataset_worker.py --src DIR --out STORE [--devices N] [--batch-size B]
        [--device-batch D] [--slow SECONDS] [--pause-at finalize|drop_progress]
        [--coordinator HOST:PORT --num-processes P --process-id I]

``--devices`` fakes N CPU devices (XLA_FLAGS, set before JAX is imported); ``--slow`` makes
every image decode take that long (so a test can kill the run mid-way); ``--pause-at NAME``
prints ``PAUSED NAME`` and sleeps when the run reaches ``gradcam_jax.dataset.store.NAME``
(``finalize``: every batch committed, the store not yet marked complete; ``drop_progress``:
marked complete, the commit markers not yet removed), so a test can kill it there; the
coordinator options run it as one process of a ``jax.distributed`` job. Prints one JSON line
at the end.

``model()`` is also the ``--model tests/dataset_worker.py:model`` of the command-line tests: a
tiny ReLU conv net (tests/nets.py) as a zoo-style ``Pretrained`` with 16 x 16 inputs.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SIZE = 16


def model():
    sys.path.insert(0, str(HERE))
    import nets

    from gradcam_jax.zoo import Pretrained

    module, variables = nets.linen(nets.weights(0))
    return Pretrained(
        "tiny",
        module,
        variables,
        [f"class{i}" for i in range(nets.NCLS)],
        input_size=SIZE,
        mean=127.5,
        std=64.0,
        default_layer="block2",
    )


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device-batch", type=int, default=None)
    p.add_argument("--methods", default="grad_cam")
    p.add_argument("--target", default=None)
    p.add_argument("--resolution", default="layer")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker-processes", type=int, default=0)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--pause-at", choices=("finalize", "drop_progress"), default=None)
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    args = p.parse_args(argv)

    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(REPO))
    import jax

    if args.coordinator:
        jax.distributed.initialize(
            args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py

    from gradcam_jax.dataset import explain_dataset, sources

    if args.slow > 0:
        original = sources.load_image

        def slow_load(file, size=224):
            time.sleep(args.slow)
            return original(file, size)

        sources.load_image = slow_load

    if args.pause_at:
        from gradcam_jax.dataset import store

        reached = getattr(store, args.pause_at)

        def pause(*a, **k):
            print(f"PAUSED {args.pause_at}", flush=True)
            time.sleep(120)
            return reached(*a, **k)

        setattr(store, args.pause_at, pause)

    methods = args.methods.split(",")
    run = explain_dataset(
        args.src,
        model(),
        methods=methods[0] if len(methods) == 1 else methods,
        target=args.target,
        out=args.out,
        batch_size=args.batch_size,
        device_batch=args.device_batch,
        resolution=args.resolution,
        workers=args.workers,
        worker_processes=args.worker_processes,
        progress=False,
    )
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "processes": jax.process_count(),
                "processed": run.processed,
                "resumed_at": run.resumed_at,
                "already_complete": run.already_complete,
                "unreadable": run.unreadable,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
