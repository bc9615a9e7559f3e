"""MoExtend: new experts and router rows in the MoE layers of a pretrained MoE model."""

from .config import MoExtendConfig
from .extension import ExtensionPlan, measure_expert_usage, plan_extension, tune_routers_and_plan
from .layer import MoExtendLayer
from .model import MoExtendModel

__all__ = [
    "ExtensionPlan",
    "MoExtendConfig",
    "MoExtendLayer",
    "MoExtendModel",
    "measure_expert_usage",
    "plan_extension",
    "tune_routers_and_plan",
]
