"""Chunked torch implementations used on CPU tensors (DESIGN section 2)."""
