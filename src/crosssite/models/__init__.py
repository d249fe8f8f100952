"""Networks of the paper's Table I and more: backbones (COVID-Net original and redesigned, a ResNet-18-style trunk)
under shared heads (classifier, contrastive projection, MS-Net auxiliary heads), with norms and adapters chosen by
name from registries; the model registry and safetensors save/load.

    model = create_model("covidnet_redesign", num_sites=2, norm="site", projection=True)
    out = model(images, site)          # ModelOutput(logits, embedding, projection, aux_logits)
    save(model, "run/model", card)     # run/model.safetensors + run/model.json
    model, card = load("run/model")
"""

from crosssite.models.adapters import ADAPTERS, ParallelAdapter, SeriesAdapter, SiteConv1x1, get_adapter_layer, \
    register_adapter
from crosssite.models.covidnet import CovidNet
from crosssite.models.heads import ModelOutput, SiteClassifier
from crosssite.models.hub import load, model_paths, save
from crosssite.models.norms import NORMS, BatchNorm, NoNorm, SiteBatchNorm, SiteLayout, SiteModule, SlotBatchNorm, \
    adapt_norm, get_norm_layer, norm_state_keys, register_norm
from crosssite.models.registry import ModelConfig, UnsupportedOption, create_model, is_model, list_models, \
    model_config, register_model
from crosssite.models.resnet import ResNet

__all__ = [
    "ADAPTERS",
    "BatchNorm",
    "CovidNet",
    "ModelConfig",
    "ModelOutput",
    "NORMS",
    "NoNorm",
    "ParallelAdapter",
    "ResNet",
    "SeriesAdapter",
    "SiteBatchNorm",
    "SiteClassifier",
    "SiteConv1x1",
    "SiteLayout",
    "SiteModule",
    "SlotBatchNorm",
    "UnsupportedOption",
    "adapt_norm",
    "create_model",
    "get_adapter_layer",
    "get_norm_layer",
    "is_model",
    "list_models",
    "load",
    "model_config",
    "model_paths",
    "norm_state_keys",
    "register_adapter",
    "register_model",
    "register_norm",
    "save",
]
