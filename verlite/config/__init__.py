"""Configuration: typed dataclasses (schema.py) and the YAML/override loader (load.py)."""

from verlite.config.load import load_config, loggers
from verlite.config.schema import (DataConfig, FSDPConfig, ModelConfig, OptimConfig, SFTConfig,
                                   TrainerConfig)

__all__ = ["load_config", "loggers", "SFTConfig", "DataConfig", "ModelConfig", "FSDPConfig",
           "OptimConfig", "TrainerConfig"]
