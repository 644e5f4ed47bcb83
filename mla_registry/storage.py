"""Where mla-registry keeps what it builds once and reuses: imported models, synthesised speech, dataset caches.
(An XDG cache folder; nothing to do with the attention KV cache.)"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MLA_REGISTRY_CACHE"


def cache_dir(*parts: str) -> Path:
    """``$MLA_REGISTRY_CACHE`` or ``$XDG_CACHE_HOME/mla-registry`` (default ``~/.cache/mla-registry``), joined
    with ``parts`` and created."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "mla-registry")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
