"""Benchmarks: ``python -m lepton_ray.bench simulate|secagg ...``. Each prints one JSON object
and, where it makes sense, ratios against a baseline measured in the same run."""
