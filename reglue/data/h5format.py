"""The encoded-dataset HDF5 layout: names shared by the writer and the reader."""

FORMAT = "reglue-encoded"
FORMAT_VERSION = 1

IMAGES = "images"  # (N, H, W, 3) uint8, one chunk per image (ADM-cropped)
MOMENTS = "moments"  # (N, 8, H/8, W/8): VAE posterior mean (channels 0..3) then std (4..7)
MOMENTS_FLIP = "moments_flip"  # the same for the horizontally flipped image (only with --flip)
LABELS = "labels"  # (N,) int64
KEYS = "keys"  # (N,) the source path of each image, for provenance
CLASS_NAMES = "class_names"  # (K,) class folder names, label order

# Attributes: progress while the file is partial, provenance once complete (the row counter and run id are
# reglue.data.append's ATTR_WRITTEN and ATTR_RUN_ID).
ATTR_COMPLETE = "complete"
ATTR_POSITION = "source_position"  # next source index to process
PARTIAL_SUFFIX = ".partial"
