"""Fail-fast loading of pretrained weights: a clear one-line message instead of a hang when offline."""

from __future__ import annotations

import os
import socket

from reglue.errors import UserError


class ModelLoadError(UserError, RuntimeError):
    """A pretrained model could not be loaded; the message says what to fetch and where to put it."""


def offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set)."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in flags)


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that a machine without network fails in seconds rather than retrying for a minute."""
    if offline():
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cache_dir() -> str:
    """The Hugging Face cache directory in force."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
