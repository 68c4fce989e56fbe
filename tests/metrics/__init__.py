"""Tests of lensjax.metrics."""
