"""Benchmarks and the GPU check (run as scripts: ``python bench/bench.py``, ``python bench/gpu_check.py``)."""
