"""Fuzz targets for every parser that reads untrusted bytes (docs/fuzzing.md)."""
