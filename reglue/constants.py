"""Every numerical convention of reglue, defined once.

Import these names instead of writing the literals: a reader who greps for ``LATENT_SCALE`` finds every
place that depends on it.
"""

# Time direction (the REPA/REG/REGLUE convention): t = 1 is pure noise, t = 0 is data.
TIME_NOISE = 1.0
TIME_DATA = 0.0

# SD-VAE latents are multiplied by this after sampling the posterior (no bias), divided before decoding.
LATENT_SCALE = 0.18215
LATENT_CHANNELS = 4
VAE_DOWNSAMPLE = 8

# Class labels: ImageNet-1k classes 0..999; label 1000 is the null class used for classifier-free guidance.
NUM_CLASSES = 1000
NULL_CLASS = 1000

# Classifier-free guidance is applied to every channel of the joint state (latents and semantics), as the
# REGLUE paper reports; the [CLS] state has its own scale. "latents" restricts it to the 4 VAE channels.
CFG_CHANNELS = "all"
CFG_CHANNEL_SETS = ("all", "latents")

# Sample quantisation, as the reference does it: clamp((x + 1) / 2 * 255, 0, 255) truncated to uint8.
SAMPLE_QUANTISATION = "clamp((x + 1) / 2 * 255, 0, 255) -> uint8 (truncate)"

# The frequency embedding of the time step: 256-d sinusoid of t in [0, 1] (unscaled), [cos, sin] halves.
TIME_FREQUENCY_DIM = 256
TIME_MAX_PERIOD = 10000

# LayerNorm epsilon used throughout the SiT backbone.
LAYER_NORM_EPS = 1e-6
