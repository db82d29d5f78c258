"""The one training loop every method runs on (`Trainer`, `fit`), its settings and multi-process support."""
from graphsurgeon.training.config import Callback, TrainConfig
from graphsurgeon.training.trainer import Trainer, fit, seed_everything

__all__ = ["Callback", "TrainConfig", "Trainer", "fit", "seed_everything"]
