"""Checkpoints: our atomic, weights-only format, and safe reading of the official REGLUE/REG/REPA files.

Our training checkpoint is one dict of plain data and tensors (see docs/checkpoints.md), written to a temp file
and renamed, and readable with ``torch.load(path, weights_only=True)``. Official files are read with
``weights_only=True`` too; only ``argparse.Namespace`` (their ``args``) and numpy's array reconstruction (their
norm statistics) are allowed, each only where that file kind needs it, so no pickled code runs.

Modules: reading (safe torch.load, strict weight loading), rng, ours (training checkpoints), official (the
reference's files), model (load_model: either), compressor (compressor files).
"""

from reglue.checkpoints.compressor import COMPRESSOR_FORMAT, load_compressor, load_norm_stats, save_compressor
from reglue.checkpoints.model import load_model
from reglue.checkpoints.official import STANDARD_SIZES, infer_official_config, map_official_keys
from reglue.checkpoints.ours import (
                                     CHECKPOINT_NAME,
                                     FORMAT,
                                     VERSION,
                                     find_latest_checkpoint,
                                     load_checkpoint,
                                     save_checkpoint,
)
from reglue.checkpoints.reading import CheckpointError
from reglue.checkpoints.rng import capture_rng_state, restore_rng_state

__all__ = ["CHECKPOINT_NAME", "COMPRESSOR_FORMAT", "FORMAT", "STANDARD_SIZES", "VERSION", "CheckpointError",
           "capture_rng_state", "find_latest_checkpoint", "infer_official_config", "load_checkpoint",
           "load_compressor", "load_model", "load_norm_stats", "map_official_keys", "restore_rng_state",
           "save_checkpoint", "save_compressor"]
