"""Out-of-tree registration of this package's methods with PEFT.

`peft.utils.register_peft_method` only accepts names of PEFT's closed `PeftType` enum. Our methods are members of
our own `(str, Enum)`: a member compares and hashes equal to the string stored in `adapter_config.json`, so once it
is written into `peft.mapping`'s four lookup tables, `get_peft_model`, `PeftConfig/PeftModel/AutoPeftModel*
.from_pretrained` and transformers' `load_adapter` all resolve it. transformers calls `peft_type.value.lower()` to
find the parameter prefix, hence an Enum member rather than a plain string.
"""

from __future__ import annotations

import enum

import peft.mapping
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner


class MoExtendPeftType(str, enum.Enum):
    """PEFT types added by `peft_moextend`; the lower-cased value plus "_" is the parameter prefix."""

    MOEXTEND = "MOEXTEND"
    SMOLA = "SMOLA"
    CMOE = "CMOE"
    MODEX = "MODEX"
    PATHWEAVE = "PATHWEAVE"

    def __str__(self) -> str:
        return self.value


def register_method(peft_type: MoExtendPeftType, config_cls: type[PeftConfig], tuner_cls: type[BaseTuner]) -> None:
    """Write one method into PEFT's lookup tables; calling it again with the same classes is a no-op."""
    prefix = f"{peft_type.value.lower()}_"
    if getattr(tuner_cls, "prefix", None) != prefix:
        raise ValueError(f"{tuner_cls.__name__}.prefix must be {prefix!r} for PEFT type {peft_type.value}")
    tables = (
        (peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        (peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING, tuner_cls),
        (peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING, prefix),
    )
    for table, value in tables:
        registered = table.get(peft_type)
        if (
            registered is not None
            and registered != value
            and getattr(registered, "__qualname__", None) != getattr(value, "__qualname__", None)
        ):
            raise KeyError(f"PEFT type {peft_type.value} is already registered to {registered!r}, not {value!r}")
        table[peft_type] = value
    # Mixed-adapter models (PeftMixedModel) are not supported by our tuners: make sure PEFT says so clearly.
    peft.mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(peft_type, None)
