"""Training: the run configuration, the method table, and the one loop that trains every method.

    from crosssite.training import TrainConfig, train
    metrics = train(TrainConfig(method="sepnorm", epochs=5, width=0.25, image_size=64), sites, "runs/x")
"""

from crosssite.training.config import TrainConfig, load_config
from crosssite.training.engine import TrainingDiverged, TrainingError, train
from crosssite.training.methods import METHODS, PAPER_TABLE_I, LossTerm, Method, compute_loss, register_method

__all__ = ["TrainConfig", "load_config", "METHODS", "PAPER_TABLE_I", "LossTerm", "Method", "register_method", "train",
           "compute_loss", "TrainingError", "TrainingDiverged"]
