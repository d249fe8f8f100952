"""Data layer: sites, image readers, synthetic sites, splits, decode cache, transforms, sampler, loaders.

The public names below are the contract the rest of crosssite codes against (docs/ARCHITECTURE.md).
"""

from crosssite.data.cache import SliceCache, cache_root
from crosssite.data.io import LUNG_WINDOW, SliceRef, expand_inputs, num_frames, read_image, read_volume
from crosssite.data.loaders import SliceDataset, build_cache, eval_loader, train_loader
from crosssite.data.sampler import MultiSiteBatchSampler, oversample_factors
from crosssite.data.sites import (
    CLASS_ALIASES,
    CLASS_NAMES,
    LAYOUTS,
    Sample,
    Site,
    class_of_name,
    detect_layout,
    load_site,
    load_sites,
    parse_site_spec,
)
from crosssite.data.splits import Split, make_folds, official_split, split_fold
from crosssite.data.synthetic import SyntheticParams, synthetic_site
from crosssite.data.transforms import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    EvalTransform,
    TrainTransform,
    eval_transform,
    resize_short_side,
    short_side_for,
    train_transform,
)

__all__ = [
    "CLASS_ALIASES", "CLASS_NAMES", "DEFAULT_MEAN", "DEFAULT_STD", "LAYOUTS", "LUNG_WINDOW",
    "EvalTransform", "MultiSiteBatchSampler", "Sample", "Site", "SliceCache", "SliceDataset", "SliceRef",
    "Split", "SyntheticParams", "TrainTransform",
    "build_cache", "cache_root", "class_of_name", "detect_layout", "eval_loader", "eval_transform",
    "expand_inputs", "load_site", "load_sites", "make_folds", "num_frames", "official_split",
    "oversample_factors", "parse_site_spec", "read_image", "read_volume", "resize_short_side",
    "short_side_for", "split_fold", "synthetic_site", "train_loader", "train_transform",
]
