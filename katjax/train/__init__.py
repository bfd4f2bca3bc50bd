"""Train state, the optimizer, pure train steps, losses, the loop and checkpoints."""

from katjax.train.state import (OptimizerConfig, TrainState, current_lr, make_optimizer,
                                make_schedule, optimizer_config)
from katjax.train.step import accumulate_gradients, train_step

__all__ = ["TrainState", "OptimizerConfig", "make_optimizer", "make_schedule",
           "optimizer_config", "current_lr", "train_step", "accumulate_gradients"]
