"""Training: the loop with its hooks (train/loop.py), the pure jitted step (train/step.py),
losses and optimizers. `from jaxgen.train import train` runs `jaxgen train` from Python."""

from jaxgen.train.loop import TrainResult, train
from jaxgen.train.step import TrainState, TrainStep

__all__ = ["TrainResult", "TrainState", "TrainStep", "train"]
