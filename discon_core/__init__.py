"""discon: discrete-conditioned continuous autoregressive image generation.

The small core: component interfaces, plugin hooks, the registry and ``build()``, checkpoint
I/O, the sampling pipeline, datasets and the batch order, training and the ``discon`` CLI's
frame. Concrete models, and everything a plugin could replace (the cache, the recipes, the
generation and evaluation commands), live in plugins (``discon_plugins`` and third-party
packages), registered through the same hooks.
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
