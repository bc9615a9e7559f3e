"""LLaVA-CMoE: continual mixture of low-rank experts with probe-guided expansion and a task locator."""

from .config import CMoEConfig
from .layer import CMoELayer
from .model import CMoEModel

__all__ = ["CMoEConfig", "CMoELayer", "CMoEModel"]
