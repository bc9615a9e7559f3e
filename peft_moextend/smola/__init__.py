"""Omni-SMoLA: soft mixtures of low-rank experts with per-modality expert groups."""

from .config import SMoLAConfig
from .layer import SMoLALayer
from .model import SMoLAModel

__all__ = ["SMoLAConfig", "SMoLALayer", "SMoLAModel"]
