"""Tests of lensjax.tasks."""
