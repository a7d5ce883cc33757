"""Mask2Former on m2f_kernels ops: configs, model, losses, data, evaluation and training.

`build_model` and `Predictor` are imported on first use so that `import m2f` stays light (no timm import).
"""

from .config import CONFIG_NAMES, ModelConfig, apply_overrides, get_config, load_config

__all__ = [
    "CONFIG_NAMES",
    "ModelConfig",
    "Predictor",
    "apply_overrides",
    "build_model",
    "get_config",
    "load_config",
]


def __getattr__(name: str):
    if name == "build_model":
        from .models.mask2former import build_model

        return build_model
    if name == "Predictor":
        from .engine.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'm2f' has no attribute {name!r}")
