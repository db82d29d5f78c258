"""The one training loop every method runs on (`Trainer`), and its multi-process support."""
from graphsurgeon.training.trainer import TrainConfig, Trainer, seed_everything

__all__ = ["TrainConfig", "Trainer", "seed_everything"]
