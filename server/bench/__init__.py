"""Benchmarks behind `apcm bench`."""
