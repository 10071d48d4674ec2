"""Concord core: registry, configuration, CLI, runner, results, training and distribution."""

from marl.core.errors import ConcordError

__all__ = ["ConcordError", "__version__"]
__version__ = "0.1.0"
