"""The evaluation suite: the ADM evaluator's FID/sFID/IS/precision/recall in PyTorch (never imports reglue)."""
