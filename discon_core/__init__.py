"""discon: discrete-conditioned continuous autoregressive image generation.

The small core: component interfaces, plugin hooks, the registry and ``build()``, checkpoint
I/O, the sampling pipeline, data/caching, training and the ``discon`` CLI. Concrete models live
in plugins (``discon_plugins`` and third-party packages).
"""
from .errors import DisconError
from .interfaces import (ConditionalBackbone, ContinuousHead, ContinuousTokenizer,
                         DiscretePrior, DiscreteTokenizer)
from .registry import build, list_components, resolve
from .pipeline import Pipeline, sample_tokens

__all__ = [
    "DisconError", "build", "list_components", "resolve",
    "DiscreteTokenizer", "ContinuousTokenizer", "DiscretePrior", "ConditionalBackbone",
    "ContinuousHead", "Pipeline", "sample_tokens",
]
__version__ = "0.1.0"
