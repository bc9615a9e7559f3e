"""ModeX: modality-expert coordinated serial adapters."""

from .config import ModeXConfig
from .layer import ModeXLayer, ModeXNormLayer
from .model import ModeXModel

__all__ = ["ModeXConfig", "ModeXLayer", "ModeXModel", "ModeXNormLayer"]
