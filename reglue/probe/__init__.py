"""The alignment probe: how a diffusion model's hidden states align with the VFM's features, block by block and
noise level by noise level (CKNNA, CKA, spatial CKA, k-NN accuracy); docs/probe.md."""
