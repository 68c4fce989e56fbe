"""Tests of lensjax.models."""
