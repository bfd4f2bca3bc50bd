"""katjax: pure-functional JAX/Flax training system for agentic coding models."""

__version__ = "0.1.0"
