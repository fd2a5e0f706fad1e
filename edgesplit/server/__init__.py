"""The server plane: the daemon (:class:`Server`, ``edgesplit serve``) and its dynamic batcher.

Names are imported lazily so that ``python -m edgesplit.server.daemon`` runs without a warning.
"""

from .batcher import Batcher, Item

__all__ = ["Batcher", "Item", "Server", "build_parser", "serve_main"]


def __getattr__(name):
    if name in ("Server", "build_parser", "serve_main"):
        from . import daemon

        return getattr(daemon, name)
    raise AttributeError(f"module 'edgesplit.server' has no attribute '{name}'")
