"""Training: the optimizer (`optim`), the jitted step (`step`), checkpoints (`checkpointing`), the
config tree (`config`) and the recipe (`trainer`).

    from jaxlora.train import load_config, train
    summary = train(load_config("run.toml"))
"""

from jaxlora.train.config import TrainConfig, TrainConfigError, load_config
from jaxlora.train.fingerprint import BaseModelMismatchError
from jaxlora.train.trainer import ModelPathError, TrainingError, resolve_model_path, setup, train

__all__ = ["BaseModelMismatchError", "ModelPathError", "TrainConfig", "TrainConfigError", "TrainingError", "load_config",
           "resolve_model_path", "setup", "train"]
