"""Frozen encoders: the SD-VAE (and a tiny stand-in); the vision foundation model lands with training."""
