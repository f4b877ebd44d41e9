"""Benchmarks: load generators, floors and peers, measured side by side in one run."""
