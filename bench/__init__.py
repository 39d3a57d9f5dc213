"""Benchmarks: not part of the test run; each prints ratios against a raw baseline of the same run."""
