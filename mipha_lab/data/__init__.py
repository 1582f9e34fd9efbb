"""Turning files on disk into model inputs: image processing (and, with the data issue, datasets)."""
