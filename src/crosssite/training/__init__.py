"""Training: the run configuration, the method table, and the one loop that trains every method.

    from crosssite.training import TrainConfig, train
    metrics = train(TrainConfig(method="sepnorm", epochs=5, width=0.25, image_size=64), sites, "runs/x")

A method's recipe (`Method.recipe`) is applied by every trainer to the keys the config was not given
(`with_recipe`), so a method name means one training whatever the entry point.
"""

from crosssite.training.config import TrainConfig, load_config, with_recipe
from crosssite.training.engine import TrainingDiverged, TrainingError, train
from crosssite.training.methods import METHODS, PAPER_TABLE_I, LossTerm, Method, compute_loss, register_method

__all__ = ["TrainConfig", "load_config", "with_recipe", "METHODS", "PAPER_TABLE_I", "LossTerm", "Method",
           "register_method", "train", "compute_loss", "TrainingError", "TrainingDiverged"]
