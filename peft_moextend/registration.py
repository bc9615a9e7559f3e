"""Out-of-tree registration of this package's methods with PEFT, and the one record of each method's identity.

`peft.utils.register_peft_method` only accepts names of PEFT's closed `PeftType` enum. Our methods are members of
our own `(str, Enum)` `ExpertPeftType`: a member compares and hashes equal to the string stored in
`adapter_config.json`, so once it is written into `peft.mapping`'s four lookup tables, `get_peft_model`,
`PeftConfig/PeftModel/AutoPeftModel*.from_pretrained` and transformers' `load_adapter` all resolve it. transformers
calls `peft_type.value.lower()` to find the parameter prefix, hence an Enum member rather than a plain string.

`METHODS` holds, per method, its display name, PEFT type and parameter prefix; configs, tuners and layers read them
from there and `register_method` checks that they agree.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import peft.mapping
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner


class ExpertPeftType(str, enum.Enum):
    """PEFT types added by `peft_moextend` (the counterpart of `peft.PeftType`); the value is what
    `adapter_config.json` stores as `peft_type`, so it never changes."""

    MOEXTEND = "MOEXTEND"
    SMOLA = "SMOLA"
    CMOE = "CMOE"
    MODEX = "MODEX"
    PATHWEAVE = "PATHWEAVE"

    def __str__(self) -> str:
        return self.value


MoExtendPeftType = ExpertPeftType
"""The enum's name before 0.2 (it read as if every method were a kind of MoExtend); kept as an alias."""


@dataclass(frozen=True)
class ExpertMethod:
    """One method's identity: `name` (docs, model cards, errors), `peft_type` (saved in `adapter_config.json`) and
    `prefix` (starts the name of every per-adapter attribute of its layers, hence of every saved tensor)."""

    name: str
    peft_type: ExpertPeftType
    prefix: str

    def __post_init__(self) -> None:
        # transformers' `load_adapter` derives the prefix from the type: the two must agree
        derived = f"{self.peft_type.value.lower()}_"
        if self.prefix != derived:
            raise ValueError(f"prefix {self.prefix!r} of {self.name} must be {derived!r} (its PEFT type lower-cased)")


METHODS: dict[ExpertPeftType, ExpertMethod] = {
    method.peft_type: method
    for method in (
        ExpertMethod("MoExtend", ExpertPeftType.MOEXTEND, "moextend_"),
        ExpertMethod("SMoLA", ExpertPeftType.SMOLA, "smola_"),
        ExpertMethod("CMoE", ExpertPeftType.CMOE, "cmoe_"),
        ExpertMethod("ModeX", ExpertPeftType.MODEX, "modex_"),
        ExpertMethod("PathWeave", ExpertPeftType.PATHWEAVE, "pathweave_"),
    )
}


def register_method(peft_type: ExpertPeftType, config_cls: type[PeftConfig], tuner_cls: type[BaseTuner]) -> None:
    """Write one method into PEFT's lookup tables; calling it again with the same classes is a no-op.

    Raises ValueError if the config, tuner or its layers disagree with the method's record in `METHODS`."""
    method = METHODS[ExpertPeftType(peft_type)]
    if getattr(tuner_cls, "prefix", None) != method.prefix:
        raise ValueError(f"{tuner_cls.__name__}.prefix must be {method.prefix!r} for PEFT type {peft_type.value}")
    for cls in (config_cls, tuner_cls):
        if getattr(cls, "method_name", method.name) != method.name:
            raise ValueError(f"{cls.__name__}.method_name must be {method.name!r} for PEFT type {peft_type.value}")
    layer_classes = getattr(tuner_cls, "tuner_layer_cls", ())
    for layer_cls in layer_classes if isinstance(layer_classes, tuple) else (layer_classes,):
        names = (*layer_cls.adapter_layer_names, *layer_cls.other_param_names)
        if wrong := [name for name in names if not name.startswith(method.prefix)]:
            raise ValueError(f"{layer_cls.__name__}'s per-adapter attributes {wrong} must start with {method.prefix!r}")
    tables = (
        (peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING, config_cls),
        (peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING, tuner_cls),
        (peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING, method.prefix),
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
