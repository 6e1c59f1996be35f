"""reglue: train, sample and evaluate REGLUE latent diffusion models and their baselines."""

__version__ = "0.1.0"
