"""peft-moextend: mixture-of-experts extension methods as first-class PEFT methods.

`import peft_moextend` registers every method with PEFT, so `get_peft_model`, `PeftModel.from_pretrained`,
`AutoPeftModel*.from_pretrained` and transformers' `load_adapter` work with their configs and adapter folders.
"""

from .compat import check_peft_internals

check_peft_internals()

from .callbacks import RouterAuxLossCallback, add_router_aux_loss_logging  # noqa: E402
from .cmoe import CMoEConfig, CMoEModel  # noqa: E402
from .expert_quantization import quantize_moe_experts  # noqa: E402
from .hub import install_push_to_hub  # noqa: E402
from .modex import ModeXConfig, ModeXModel  # noqa: E402
from .moextend import (  # noqa: E402
    ExtensionPlan,
    MoExtendConfig,
    MoExtendModel,
    measure_expert_usage,
    plan_extension,
    tune_routers_and_plan,
)
from .pathweave import PathWeaveConfig, PathWeaveModel  # noqa: E402
from .registration import METHODS, ExpertMethod, ExpertPeftType, MoExtendPeftType, register_method  # noqa: E402
from .smola import SMoLAConfig, SMoLAModel  # noqa: E402

register_method(ExpertPeftType.MOEXTEND, MoExtendConfig, MoExtendModel)
register_method(ExpertPeftType.SMOLA, SMoLAConfig, SMoLAModel)
register_method(ExpertPeftType.CMOE, CMoEConfig, CMoEModel)
register_method(ExpertPeftType.MODEX, ModeXConfig, ModeXModel)
register_method(ExpertPeftType.PATHWEAVE, PathWeaveConfig, PathWeaveModel)
install_push_to_hub()

__version__ = "0.1.0"

__all__ = [
    "PathWeaveConfig",
    "PathWeaveModel",
    "ModeXConfig",
    "ModeXModel",
    "CMoEConfig",
    "CMoEModel",
    "RouterAuxLossCallback",
    "add_router_aux_loss_logging",
    "ExtensionPlan",
    "MoExtendConfig",
    "MoExtendModel",
    "ExpertMethod",
    "ExpertPeftType",
    "METHODS",
    "MoExtendPeftType",
    "measure_expert_usage",
    "plan_extension",
    "quantize_moe_experts",
    "register_method",
    "SMoLAConfig",
    "SMoLAModel",
    "tune_routers_and_plan",
]
