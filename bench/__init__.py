"""Benchmarks: every figure is a ratio against a floor measured in the same run (targets: docs/design.md section 11; figures: docs/performance.md)."""
