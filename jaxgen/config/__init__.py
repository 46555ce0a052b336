"""Configs: the typed schema of an experiment, YAML loading with overrides, model presets."""

from jaxgen.config.loading import (
    PLACEHOLDER_KEYS,
    apply_overrides,
    check_no_placeholders,
    config_from_dict,
    load_config,
    read_yaml,
    to_yaml,
)
from jaxgen.config.presets import PRESETS
from jaxgen.config.schema import (
    LORA_TARGETS,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    GenerateConfig,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "LORA_TARGETS",
    "PLACEHOLDER_KEYS",
    "PRESETS",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "FinetuneConfig",
    "GenerateConfig",
    "LoraConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TokenizerConfig",
    "TrainConfig",
    "apply_overrides",
    "check_no_placeholders",
    "config_from_dict",
    "load_config",
    "read_yaml",
    "to_yaml",
]
