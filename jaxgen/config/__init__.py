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
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    GenerateConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "PLACEHOLDER_KEYS",
    "PRESETS",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "GenerateConfig",
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
