"""Decide once, before transformers/datasets are imported, whether the Hugging Face Hub is reachable.

Without a network the Hub client retries each request for ~25 s before failing; on an air-gapped machine
that is minutes of waiting per run. When a 2-second connection probe fails we set ``HF_HUB_OFFLINE=1``,
so cached files load at once and missing ones fail at once with a clear message.
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

logger = logging.getLogger(__name__)
TRUTHY = ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when a TCP connection to the Hub endpoint (``HF_ENDPOINT``) opens within ``timeout``."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def configure_offline_mode(timeout: float = 2.0) -> bool:
    """Set ``HF_HUB_OFFLINE=1`` when the Hub can't be reached; returns whether we are offline.

    Call it before importing transformers, datasets or huggingface_hub: they read the variable at import.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUTHY:
        return True
    if hub_reachable(timeout):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    logger.warning("the Hugging Face Hub is unreachable: working offline (cached models and datasets only)")
    return True
