"""The edge plane: the deploy agent (no torch, ever). Names are imported lazily."""

__all__ = ["Agent", "AgentError", "FrameResult", "agent_main", "build_parser", "summarize"]


def __getattr__(name):
    if name in __all__:
        from . import agent

        return getattr(agent, name)
    raise AttributeError(f"module 'edgesplit.edge' has no attribute '{name}'")
