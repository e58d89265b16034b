"""Whole-adapter operations: merge, resize, extract, bake."""
