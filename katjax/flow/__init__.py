"""SeamlessFlow: the trajectory manager between agents and the engine (skeleton)."""

from katjax.flow.manager import Branch, TrajectoryManager

__all__ = ["Branch", "TrajectoryManager"]
