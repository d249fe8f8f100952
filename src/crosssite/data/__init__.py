"""Data layer: sites, image readers, synthetic sites, splits, decode cache, transforms, sampler, loaders.

The public names below are the contract the rest of crosssite codes against (docs/ARCHITECTURE.md).
The modules, in pipeline order:

* ``sites``: `Sample`, `Site`, ``NAME=PATH[:LAYOUT]`` specs and the layouts (a new layout is a loader
  function in `load_site`'s table, plus a rule in `detect_layout`);
* ``io``: `read_image` for PNG/JPEG/DICOM/NIfTI (a new file format is a suffix in `image_kind` and a
  reader branch in `read_image`), `expand_inputs` for volumes and series;
* ``synthetic``: the built-in CT-like sites; ``splits``: folds, validation parts, the official split;
* ``cache``: `SliceCache`; ``transforms``: crops, flips, normalisation; ``sampler``:
  `MultiSiteBatchSampler`; ``loaders``: datasets and loaders; ``resident``: the loaders' device-resident twins
  (slices kept on the accelerator as uint8, cropped and flipped there); ``check``: the ``data check`` report.
"""

from crosssite.data.cache import SliceCache, cache_root
from crosssite.data.check import check_sites
from crosssite.data.io import (
    LUNG_WINDOW,
    ImageInfo,
    SliceRef,
    expand_inputs,
    inspect_image,
    num_frames,
    read_image,
    read_volume,
)
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
    load_manifest,
    load_site,
    load_sites,
    parse_site_spec,
    synthetic_site,
)
from crosssite.data.splits import Split, all_data_split, make_folds, official_split, split_fold
from crosssite.data.synthetic import SyntheticParams
from crosssite.data.transforms import (
    DEFAULT_FRAME,
    DEFAULT_MEAN,
    DEFAULT_STD,
    FRAMES,
    EvalTransform,
    Normalise,
    TTA_MODES,
    TrainTransform,
    card_tta,
    eval_transform,
    resize_short_side,
    frame_slice,
    preprocessing_transform,
    short_side_for,
    train_transform,
    tta_average,
)

__all__ = [
    "CLASS_ALIASES", "CLASS_NAMES", "DEFAULT_FRAME", "DEFAULT_MEAN", "FRAMES", "frame_slice", "preprocessing_transform", "DEFAULT_STD", "LAYOUTS", "LUNG_WINDOW",
    "EvalTransform", "ImageInfo", "MultiSiteBatchSampler", "Normalise", "Sample", "Site", "SliceCache",
    "SliceDataset", "SliceRef", "Split", "SyntheticParams", "TrainTransform", "TTA_MODES",
    "build_cache", "cache_root", "check_sites", "class_of_name", "detect_layout", "eval_loader",
    "eval_transform", "expand_inputs", "inspect_image", "load_manifest", "load_site", "load_sites",
    "all_data_split", "make_folds", "num_frames", "official_split",
    "oversample_factors", "parse_site_spec", "read_image", "read_volume", "resize_short_side",
    "short_side_for", "split_fold", "synthetic_site", "train_loader", "train_transform", "tta_average", "card_tta",
]
