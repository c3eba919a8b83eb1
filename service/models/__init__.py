"""Tensors: loading checkpoints, tokenisation, pooling, units (what a backend scores), and the two
backends (the padded HF one and the packed fast path with its attention)."""
