"""The evaluation suite: the ADM evaluator's FID/sFID/IS/precision/recall in PyTorch, and the project's base layer.

It never imports reglue (tests/test_architecture.py checks every import, those inside functions included): it
stays usable alone, and reglue takes its error base, file errors, JSON reader, determinism rules, collectives and
environment record from it (docs/architecture.md).
"""
