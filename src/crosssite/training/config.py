"""`TrainConfig`: every knob of a training run in one dataclass, loaded from YAML and ``--set key=value`` overrides,
and `with_recipe`, the one place a method's recipe enters a configuration.

Values are typed by the dataclass field types; an unknown key, a value of the wrong type, or an out-of-range value
raises `crosssite.errors.ConfigError` naming the key (and, for an unknown key, listing the valid ones).

Precedence, the same for every entry point (Python `train`, ``crosssite train``, ``experiment``, ``federated``):
the dataclass defaults < a preset (`preset_config`) < the method's recipe (`Method.recipe`) < the values a caller
gives (keyword arguments, a YAML file, ``--set``). A `TrainConfig` remembers which keys were given; every trainer
calls `with_recipe` when it starts, so the recipe fills exactly the keys nobody chose, and the run's config.yaml
holds the result.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from crosssite.data import FRAMES, TTA_MODES
from crosssite.errors import ConfigError, TrainingError
from crosssite.models import is_model, list_models
from crosssite.ioutil import atomic_write_text
from crosssite.training.methods import METHODS

__all__ = ["TrainConfig", "load_config", "parse_overrides", "apply_overrides", "preset_config", "with_recipe",
           "save_config", "resumed_config", "RUNTIME_KEYS"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "block_act": ("none", "relu"),
    "frame": FRAMES,
    "input_norm": ("train", "fixed"),
    "init": ("auto", "default", "fan_in"),
    "schedule_per": ("step", "epoch"),
    "contrastive_form": ("ntxent", "eq4"),
    "protocol": ("kfold", "official", "all"),
    "precision": ("auto", "fp32", "bf16", "fp64"),
    "device": ("auto", "cpu", "cuda"),
    "data_on_device": ("auto", "on", "off"),
    "tta": TTA_MODES,
}


@dataclass
class TrainConfig:
    """Configuration of one training run (the defaults are the paper's but for the method; see docs of each group).

    The fields hold the caller's values over the defaults; the method's recipe is added by `with_recipe` when a
    run starts, so ``TrainConfig().tta`` is the paper's while a run of the default method trains with its recipe.
    """

    # the keys a caller gave (keyword arguments, `replace`, `apply_overrides`): the recipe never overrides them
    _given: ClassVar[frozenset[str]] = frozenset()

    # what to train: by default the row the committed grid ranks first on validation among those that train one
    # model for every site (`crosssite.reporting.choice.chosen_row` over results/cpu-v2; tests/test_recipe.py checks
    # the two agree), trained with that method's recipe (`with_recipe`)
    method: str = "crosssite"
    backbone: str = "covidnet_redesign"
    width: float = 1.0
    block_act: str = "none"
    # weight initialisation: "auto" is the backbone's own (fan-in for the normalisation-free `covidnet`,
    # PyTorch's defaults for the redesign); "default" / "fan_in" force one (crosssite.models.covidnet)
    init: str = "auto"
    # MixStyle (Zhou et al., ICLR 2021) probability after the stem and stages 1-2 in training (0: off)
    mixstyle: float = 0.0
    # every input image standardised on its own inside the network (models.norms.standardise_images), in training and
    # at inference: the site's intensity scale never reaches it
    standardise_input: bool = False
    image_size: int = 224
    # how a slice becomes a square (crosssite.data.transforms): "pad" / "resize" keep the whole slice in view
    # ("pad", the default, chosen on validation: docs/METHODS.md), "crop" keeps a central square of a
    # short-side-resized slice (kept so models trained with it stay reproducible), "canonical" the lung field in
    # canonical greys (crosssite.data.canonical), "canonical-aerated" the same anchored on the aerated lung,
    # "canonical-lungs" that with only the lungs in view, "canonical-equalised" the lung field histogram-equalised
    frame: str = "pad"
    # input normalisation: "train" = pixel mean / std of the run's training part (stored in the model card);
    # "fixed" = the constants DEFAULT_MEAN / DEFAULT_STD (the same for every run). A federated client sees only its
    # own site, so "train" standardises every site's intensities separately there
    input_norm: str = "train"
    # optimisation (Adam, cosine to lr_min; step decay x0.1 every 30 of 100 epochs for `covidnet`)
    epochs: int = 100
    batch_per_site: int = 16
    # optimiser steps per epoch; 0: the sampler's rule (the longest oversampled site list / batch_per_site).
    # `single` sets it for each of its per-site runs to the multi-site runs' count, with a batch of
    # batch_per_site x number of sites (32) from its one site, so every row of Table I makes as many steps.
    steps_per_epoch: int = 0
    # false: training batches are seen through the evaluation view (no random crop or flip), e.g. to compare
    # process counts step for step, since crops and flips are drawn per rank
    augment: bool = True
    # scanner-style augmentation of the framed slice before the crop (crosssite.data.augment): the probability
    # with which each of its transforms (window, gamma, contrast, blur, sharpen, noise, resolution, JPEG, field
    # of view) is applied; 0 = off (off until leave-one-site-out evidence says it helps an unseen site)
    augment_scanner: float = 0.0
    # invariance training (crosssite.data.augment), both off until the unseen-hospital protocol
    # (scripts/unseen_protocol.py) chooses: the probability that a training slice is re-rendered by a freshly drawn
    # simulated hospital (window, field of view, matrix, kernel, noise, overlays, file format; framed again), and the
    # probability that its input goes through a random shallow convolution (RandConv)
    augment_hospital: float = 0.0
    augment_randconv: float = 0.0
    oversample: int = 4  # a site with < half the largest site's training items is repeated this often per epoch
    lr: float = 1e-4
    lr_min: float = 1e-6
    weight_decay: float = 1e-7
    grad_clip: float = 2.0  # 0 disables clipping
    schedule_per: str = "step"
    # objectives
    tau: float = 0.05
    alpha: float = 1.0
    contrastive_form: str = "ntxent"
    kt_weight: float = 1.0
    kt_temperature: float = 2.0
    # the universal head's cross-entropy against (1 - e) one-hot + e / 2 (Szegedy et al., 2016); 0: hard labels
    label_smoothing: float = 0.0
    # exponential moving average of the weights (and BN buffers), updated after every optimiser step with this
    # decay: the averaged model is the one validated, selected and saved (Polyak averaging); 0: off
    ema_decay: float = 0.0
    # batch-norm statistics: before each validation, recompute every BN running mean / variance as the plain
    # average over the training part seen through the evaluation transform ("precise BN"); off in the paper
    bn_recalibrate: bool = False
    # images per site the recalibration averages over, in batches of 4 x batch_per_site per site (0: as many as
    # one training epoch draws, in training-sized batches, which reproduces the grids of results/cpu-real)
    bn_recalibrate_images: int = 1024
    # a validation whose P(COVID) varies less than this (standard deviation over a site's validation part)
    # flags the run as collapsed: its numbers are noise around the class prior, not a result
    collapse_std: float = 1e-3
    # test-time augmentation of every validation, test and (through the model card) later prediction:
    # "flip" averages P(COVID) over each slice and its left-right mirror (crosssite.data.tta_average); "none": the
    # slice alone (the paper)
    tta: str = "none"
    # data and protocol
    seed: int = 0  # model initialisation, batch order, augmentation
    split_seed: int = 0  # folds and the limit_per_site subset (kept fixed across seeds)
    fold: int = 0
    folds: int = 4
    val_fraction: float = 0.2
    protocol: str = "kfold"
    limit_per_site: int = 0  # 0 = every sample; else a stratified subset of this many per site
    skip_bad: bool = False
    # speed (docs/PERFORMANCE.md): none of these changes what is computed beyond floating-point rounding
    # "bf16": autocast to bfloat16; "auto" (resolved when the run starts, stored resolved): bf16 where the device
    # has native bf16 and the network is large (crosssite.training.precision), else fp32; "fp64": weights and
    # inputs in float64, the reference arithmetic whose rounding no CPU kind's kernels can amplify (tests)
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False  # torch.compile (inductor) the model; falls back to eager with one line if it fails
    # training batches carry their per-site counts as Python ints (`crosssite.models.SiteLayout`): no host sync
    static_layout: bool = True
    fused_adam: bool = True  # Adam's fused kernel (fused=True) instead of the per-parameter loop
    workers: int = 0
    # every slice kept on the device as uint8 and cropped, flipped and normalised there (crosssite.data.resident);
    # auto: on CUDA whenever the frame and augmentation allow it
    data_on_device: str = "auto"
    device: str = "auto"
    # bookkeeping
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    log_every: int = 10  # steps between progress-bar / TensorBoard updates
    ckpt_every: int = 50  # steps between mid-epoch checkpoints (0: only at epoch ends)

    def __new__(cls, **given: Any) -> TrainConfig:
        config = super().__new__(cls)
        config._given = frozenset(given)
        return config

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first key whose value is out of range."""
        if self.method not in METHODS:
            raise ConfigError(f"method: unknown {self.method!r}; valid: {', '.join(METHODS)}")
        if not is_model(self.backbone):
            raise ConfigError(f"backbone: unknown {self.backbone!r}; valid: {', '.join(list_models())}")
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(choices)}")
        positive = ("width", "image_size", "epochs", "batch_per_site", "lr", "tau", "kt_temperature", "folds")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)!r}")
        non_negative = (
            "lr_min", "weight_decay", "grad_clip", "alpha", "kt_weight", "seed", "split_seed", "limit_per_site",
            "workers", "ckpt_every", "steps_per_epoch", "collapse_std", "mixstyle", "bn_recalibrate_images",
        )
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)!r}")
        for key in ("eval_every", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)!r}")
        if self.oversample < 1:
            raise ConfigError(f"oversample: must be >= 1, got {self.oversample!r}")
        if not 0 <= self.fold < self.folds:
            raise ConfigError(f"fold: must be in [0, folds={self.folds}), got {self.fold!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in (0, 1), got {self.val_fraction!r}")
        if not 0 <= self.augment_scanner <= 1:
            raise ConfigError(f"augment_scanner: must be in [0, 1] (probability per transform), got {self.augment_scanner!r}")
        for key in ("augment_hospital", "augment_randconv"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key}: must be in [0, 1] (probability per slice), got {getattr(self, key)!r}")
        for key in ("label_smoothing", "ema_decay"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be in [0, 1), got {getattr(self, key)!r}")
        if self.lr_min > self.lr:
            raise ConfigError(f"lr_min: must not exceed lr={self.lr}, got {self.lr_min!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated); they join the keys given."""
        copy = dataclasses.replace(self, **changes)
        copy._given = self._given | frozenset(changes)
        return copy

    @property
    def given(self) -> frozenset[str]:
        """The keys a caller chose (the method's recipe leaves them alone)."""
        return self._given


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert ``value`` (a YAML scalar or a ``--set`` string) to the field type, or raise `ConfigError`."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not isinstance(value, (str, int, float)):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value).strip()


def apply_overrides(config: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A copy of ``config`` with ``values`` (key -> raw value) coerced to the field types and validated."""
    types = _field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(types)}")
    changes = {key: _coerce(key, value, types[key]) for key, value in values.items()}
    return config.replace(**changes)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["lr=1e-3", "epochs=5"]`` -> ``{"lr": "1e-3", "epochs": "5"}``; a pair without ``=`` is an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value")
        out[key.strip()] = value
    return out


def preset_config(preset: Mapping[str, Any], values: Mapping[str, Any]) -> TrainConfig:
    """Defaults < ``preset`` < (when the run starts) the method's recipe < ``values`` (raw values, coerced): a preset
    sets the scale of a grid, a recipe what its method needs over it, the user has the last word."""
    config = apply_overrides(TrainConfig(), {**preset, **values})
    config._given = frozenset(values)
    return config


def with_recipe(config: TrainConfig) -> TrainConfig:
    """``config`` with its method's recipe (`crosssite.training.methods.Method.recipe`) in every key not given:
    what every trainer runs and writes to config.yaml; the same for every entry point. Applying it twice changes
    nothing."""
    recipe = {key: value for key, value in METHODS[config.method].recipe if key not in config.given}
    return config.replace(**recipe)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path``, then ``--set`` ``overrides`` (``key=value`` strings); the values of
    both are given (a config file, e.g. a run's own config.yaml, holds what its author chose)."""
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        try:
            config = apply_overrides(config, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    if overrides:
        config = apply_overrides(config, parse_overrides(overrides))
    return config


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))


# Keys that may change when a run is resumed: they change speed or bookkeeping, not what is computed.
RUNTIME_KEYS = ("workers", "device", "data_on_device", "compile", "channels_last", "static_layout", "fused_adam",
                "log_every", "ckpt_every")


def resumed_config(config: TrainConfig, saved: dict[str, Any], where: Path) -> TrainConfig:
    """The saved config with the runtime keys of ``config``; any other difference is an error."""
    saved_config = TrainConfig(**saved)
    differ = [k for k in saved if k not in RUNTIME_KEYS and getattr(config, k) != saved[k]]
    if differ:
        changes = ", ".join(f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in differ)
        raise TrainingError(f"{where}: cannot resume with a different configuration ({changes})")
    return saved_config.replace(**{k: getattr(config, k) for k in RUNTIME_KEYS})
