"""Training: the semantic pipeline (VFM -> standardise -> compressor), the diffusion and compressor loops."""
