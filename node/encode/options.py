"""How result objects are labelled: `OutputOptions`, which lives with the node's configuration
(node.config, its `output:` section) and is imported from here by the encoders."""

from __future__ import annotations

from node.config import OutputOptions

__all__ = ["OutputOptions"]
