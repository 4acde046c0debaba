"""The benchmark scripts, run from the repository root as modules: ``python -m benchmarks.bench_throughput``.

``harness`` holds what they all measure with (interleaved timing, compilation, memory, XLA's
figures, tables); ``peers`` the side-by-side comparison with pytorch-grad-cam and Captum that
``python -m benchmarks.compare_peers`` runs. See benchmarks/README.md.
"""
