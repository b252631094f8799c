"""Run configuration: schema, YAML loading, dotted overrides. Pure Python (no torch)."""

from tuneforge.config.load import apply_overrides, dump_config, load_config, read_yaml, validate_config
from tuneforge.config.schema import METHOD_NAMES, DataConfig, ModelConfig, RunConfig, TrainConfig

__all__ = [
    "METHOD_NAMES", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig",
    "apply_overrides", "dump_config", "load_config", "read_yaml", "validate_config",
]
