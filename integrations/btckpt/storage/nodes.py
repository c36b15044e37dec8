"""This node's index in the platform's layout (``$BT_NODE_RANK``), which names its ``rank-<node>`` folder.

Read by discovery (which folder of a nested load dir is ours) and by the world description. Imports only
``errors``.
"""

from __future__ import annotations

import os

from ..errors import ConfigError

__all__ = ["node_rank"]


def node_rank() -> int:
    """This node's rank: ``$BT_NODE_RANK``, else 0 (names this node's ``rank-<node>`` folder)."""
    raw = os.environ.get("BT_NODE_RANK", "0").strip() or "0"
    if not raw.isdigit():
        raise ConfigError(f"BT_NODE_RANK={raw!r} is not a non-negative integer; unset it or fix the value")
    return int(raw)
