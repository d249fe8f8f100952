"""Training: the run configuration, the method table, and the one loop that trains every method.

    from crosssite.training import TrainConfig, train
    metrics = train(TrainConfig(method="sepnorm", epochs=5, width=0.25, image_size=64), sites, "runs/x")
"""

from crosssite.training.config import TrainConfig, load_config
from crosssite.training.engine import TrainingDiverged, TrainingError, compute_loss, train
from crosssite.training.methods import METHODS, Method

__all__ = ["TrainConfig", "load_config", "METHODS", "Method", "train", "compute_loss", "TrainingError",
           "TrainingDiverged"]
