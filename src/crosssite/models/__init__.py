"""Networks of the paper's Table I: original and redesigned COVID-Net with per-site norms, adapters,
MS-Net auxiliary heads and a contrastive projection head; registry and safetensors save/load.

    model = create_model("covidnet_redesign", num_sites=2, norm="site", projection=True)
    out = model(images, site)          # ModelOutput(logits, embedding, projection, aux_logits)
    save(model, "run/model", card)     # run/model.safetensors + run/model.json
    model, card = load("run/model")
"""

from crosssite.models.adapters import ParallelAdapter, SeriesAdapter, SiteConv1x1
from crosssite.models.covidnet import CovidNet, ModelOutput
from crosssite.models.hub import load, model_paths, save
from crosssite.models.norms import NORMS, BatchNorm, NoNorm, SiteBatchNorm, SiteLayout, SiteModule, SlotBatchNorm, adapt_norm, \
    convert_site_batchnorm, get_norm_layer, norm_state_keys, use_sites
from crosssite.models.registry import ModelConfig, create_model, is_model, list_models, model_config, register_model

__all__ = [
    "BatchNorm",
    "CovidNet",
    "ModelOutput",
    "NORMS",
    "NoNorm",
    "ParallelAdapter",
    "SeriesAdapter",
    "SiteBatchNorm",
    "SiteConv1x1",
    "SiteLayout",
    "SiteModule",
    "adapt_norm",
    "create_model",
    "get_norm_layer",
    "is_model",
    "list_models",
    "load",
    "model_paths",
    "norm_state_keys",
    "register_model",
    "SlotBatchNorm",
    "convert_site_batchnorm",
    "use_sites",
    "ModelConfig",
    "model_config",
    "save",
]
