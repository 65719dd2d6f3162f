"""Measurement code used by ``tools/`` only (benchmarks, comparisons with other methods). Nothing in
the library imports it."""
