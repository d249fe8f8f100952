"""TrainConfig from YAML and --set, its errors, the method table, the schedules and atomic checkpoints."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from crosssite.errors import CheckpointError, ConfigError
from crosssite.training import METHODS, PAPER_TABLE_I, TrainConfig, load_config
from crosssite.ioutil import _UMASK, atomic_write_text
from crosssite.training.checkpoint import load_checkpoint, save_checkpoint
from crosssite.training.config import save_config
from crosssite.training.methods import model_kwargs
from crosssite.training.schedule import lr_at, step_decay_period


def test_defaults_are_the_papers_but_the_method() -> None:
    c = TrainConfig()
    # the method is the row the committed grid picks (tests/test_recipe.py), the paper's method with crosssite's recipe
    assert (c.method, c.backbone, c.epochs, c.image_size, c.batch_per_site) == (
        "crosssite", "covidnet_redesign", 100, 224, 16)
    assert (c.lr, c.weight_decay, c.grad_clip, c.tau, c.alpha) == (1e-4, 1e-7, 2.0, 0.05, 1.0)


def test_yaml_then_set_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.001\nmethod: joint\nchannels_last: true\n")
    c = load_config(path, ["epochs=3", "width=0.25", "compile=yes", "precision=bf16"])
    assert (c.epochs, c.lr, c.method, c.channels_last, c.width, c.compile, c.precision) == (
        3, 1e-3, "joint", True, 0.25, True, "bf16")
    assert isinstance(c.epochs, int) and isinstance(c.width, float)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    c = load_config(None, ["epochs=5", "seed=3", "method=ms-net"])
    save_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["method"] == "ms-net"


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'.*valid keys: .*epochs"):
        load_config(None, ["epoch=3"])
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'learning_rate'"):
        load_config(path)


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("epochs=ten", "epochs: expected an integer"),
        ("lr=fast", "lr: expected a number"),
        ("compile=maybe", "compile: expected a boolean"),
        ("method=resnet", "method: unknown 'resnet'"),
        ("precision=fp16", "precision: 'fp16' is not one of"),
        ("epochs=0", "epochs: must be positive"),
        ("fold=4", r"fold: must be in \[0, folds=4\)"),
        ("val_fraction=1.5", "val_fraction"),
        ("grad_clip=-1", "grad_clip: must be >= 0"),
        ("lr_min=1", "lr_min: must not exceed"),
        ("epochs", "expected key=value"),
    ],
)
def test_bad_values_name_the_key(pair: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [pair])


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_method_table_covers_table_one() -> None:
    assert {method for method, _ in PAPER_TABLE_I} <= set(METHODS)  # every row of the paper's Table I is trainable

    def kw(m: str, b: str = "covidnet_redesign") -> dict:
        return model_kwargs(METHODS[m], b, num_sites=2, width=1.0, block_act="none")

    for name, method in METHODS.items():  # every registered method builds the model it declares
        assert (kw(name)["norm"], kw(name)["adapter"], kw(name)["aux_heads"], kw(name)["projection"]) == (
            method.norm, method.adapter, method.aux_heads, method.projection), name

    assert kw("joint")["norm"] == "batch" and kw("single")["norm"] == "batch" and METHODS["single"].per_site
    assert kw("sepnorm")["norm"] == "site" and not kw("sepnorm")["projection"]
    assert kw("sepnorm-contrastive")["projection"] and METHODS["sepnorm-contrastive"].contrastive
    assert kw("series-adapter")["adapter"] == "series" and kw("parallel-adapter")["adapter"] == "parallel"
    assert kw("ms-net")["aux_heads"] and METHODS["ms-net"].knowledge_transfer
    assert kw("joint", "covidnet")["norm"] == "none"  # the original COVID-Net has no BN at all


def test_cosine_schedule_per_step_and_epoch() -> None:
    kw = dict(steps_per_epoch=10, epochs=5, lr=1e-3, lr_min=1e-5)
    assert lr_at(0, **kw) == pytest.approx(1e-3)
    assert lr_at(25, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # halfway
    values = [lr_at(s, **kw) for s in range(50)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] > 1e-5
    per_epoch = [lr_at(s, per="epoch", **kw) for s in range(50)]
    assert len(set(per_epoch[:10])) == 1 and per_epoch[10] < per_epoch[9]
    assert per_epoch[20] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 2 / 5)))


def test_step_decay_scaled_to_epoch_count() -> None:
    assert step_decay_period(100) == 30 and step_decay_period(10) == 3 and step_decay_period(1) == 1
    kw = dict(steps_per_epoch=4, epochs=10, lr=1.0, lr_min=0.0, kind="step")
    assert [lr_at(e * 4, **kw) for e in (0, 2, 3, 5, 6, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001])


def test_checkpoint_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(3.0)}, "step": 7})
    state = load_checkpoint(path)
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="last.pt: cannot read checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none.pt")


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_UMASK  # the mode open() would give, not mkstemp's 0600


def test_unknown_backbone_lists_registered_models() -> None:
    with pytest.raises(ConfigError, match=r"backbone: unknown 'resnet50'; valid: .*covidnet_redesign"):
        load_config(None, ["backbone=resnet50"])
