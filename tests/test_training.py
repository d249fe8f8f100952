"""The training loop on tiny synthetic sites: every method, run files, determinism, resume after SIGKILL, NaN stop,
and the `crosssite train` command. (Learning-quality tests are in test_training_learning.py.)"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from crosssite.data import load_sites
from crosssite.errors import SiteError
from crosssite.training import METHODS, TrainConfig, TrainingDiverged, TrainingError, train
from crosssite.training.checkpoint import load_checkpoint

# 16 slices per class = 4 patients per class; 2 folds leave 1 training patient per class after validation.
SPECS = [f"s{i}=synthetic:shift={shift},n=16,size=48,seed={i}" for i, shift in enumerate((0.0, 0.8, 1.6))]
TINY = dict(image_size=32, width=0.0625, batch_per_site=4, folds=2, epochs=1, lr=1e-3, ckpt_every=0)



@pytest.fixture(scope="module")
def sites3():
    return load_sites(SPECS)


def tiny(**changes) -> TrainConfig:
    return TrainConfig(**{**TINY, **changes})


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("num_sites", [2, 3])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains(method: str, num_sites: int, sites3, tmp_path: Path) -> None:
    sites = sites3[:num_sites]
    metrics = train(tiny(method=method), sites, tmp_path, progress=False)
    names = [s.name for s in sites]
    assert list(metrics["sites"]) == names
    for name in names:
        for part in ("val", "test"):
            assert set(metrics["sites"][name][part]) == {"accuracy", "f1", "recall", "specificity", "precision", "auc"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    runs = [tmp_path / n for n in names] if METHODS[method].per_site else [tmp_path]
    for run in runs:
        for name in ("config.yaml", "split.json", "log.csv", "model.safetensors", "model.json", "predictions.csv",
                     "checkpoints/last.pt"):
            assert (run / name).is_file(), name
        rows = read_log(run / "log.csv")
        assert len(rows) == 1 and float(rows[0]["loss"]) > 0
        if METHODS[method].contrastive:
            assert float(rows[0]["con"]) > 0
        if METHODS[method].knowledge_transfer:
            assert float(rows[0]["aux_ce"]) > 0 and "kt" in rows[0]
    # one model on all sites, or one per site
    assert metrics["steps"] > 0


def test_run_files_hold_what_they_promise(sites3, tmp_path: Path) -> None:
    sites = sites3[:2]
    metrics = train(tiny(method="sepnorm-contrastive", epochs=2), sites, tmp_path, progress=False)
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["site_names"] == ["s0", "s1"] and card["class_names"] == ["non-COVID", "COVID"]
    assert card["train_config"]["method"] == "sepnorm-contrastive" and card["preprocessing"]["image_size"] == 32
    assert card["model_args"]["norm"] == "site" and card["model_args"]["projection"] is True
    split = json.loads((tmp_path / "split.json").read_text())
    for entry, site in zip(split["sites"], sites):
        parts = [set(entry[p]["indices"]) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        patients = [{site.samples[i].patient for i in p} for p in parts]
        assert not (patients[0] & patients[2] or patients[1] & patients[2])  # grouped by patient
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["part"] for r in rows} == {"val", "test"} and {r["site"] for r in rows} == {"s0", "s1"}
    n_test = sum(metrics["sites"][s]["n_test"] for s in ("s0", "s1"))
    assert sum(r["part"] == "test" for r in rows) == n_test
    log = read_log(tmp_path / "log.csv")
    assert [int(r["epoch"]) for r in log] == [1, 2]
    assert {"lr", "loss", "ce", "con", "val_auc_s0", "val_auc_s1", "val_auc_mean", "images_per_s"} <= set(log[0])
    best = max(log, key=lambda r: float(r["val_selection"]))
    assert metrics["best_epoch"] == int(best["epoch"])  # chosen on validation
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["state"]["finished"] and state["state"]["global_step"] == metrics["steps"]


def test_bf16_channels_last_and_covidnet(sites3, tmp_path: Path) -> None:
    metrics = train(tiny(method="joint", precision="bf16", channels_last=True), sites3[:2], tmp_path / "a",
                    progress=False)
    assert metrics["steps"] > 0
    metrics = train(tiny(method="joint", backbone="covidnet"), sites3[:2], tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "model.json").read_text())["model_args"]["norm"] == "none"


def test_identical_runs_give_identical_losses(sites3, tmp_path: Path) -> None:
    config = tiny(method="sepnorm-contrastive", epochs=2, seed=5)
    train(config, sites3[:2], tmp_path / "a", progress=False)
    train(config, sites3[:2], tmp_path / "b", progress=False)
    drop = ("images_per_s", "time_s")
    a, b = ([{k: v for k, v in r.items() if k not in drop} for r in read_log(p / "log.csv")] for p in
            (tmp_path / "a", tmp_path / "b"))
    assert a == b
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    other = train(config.replace(seed=6), sites3[:2], tmp_path / "c", progress=False)
    assert read_log(tmp_path / "c" / "log.csv")[0]["loss"] != a[0]["loss"] and other["steps"] > 0


def test_existing_run_needs_resume_and_finished_run_returns_metrics(sites3, tmp_path: Path) -> None:
    config = tiny(method="joint")
    first = train(config, sites3[:2], tmp_path, progress=False)
    with pytest.raises(TrainingError, match="already holds a run"):
        train(config, sites3[:2], tmp_path, progress=False)
    stamp = (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert train(config, sites3[:2], tmp_path, resume=True, progress=False) == first
    assert (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns == stamp  # nothing trained again
    with pytest.raises(TrainingError, match=r"different configuration \(lr"):
        train(config.replace(lr=0.5), sites3[:2], tmp_path, resume=True, progress=False)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(sites3, tmp_path: Path) -> None:
    """A real divergence: Adam with lr 1e30 throws the weights to ~1e31, the next forward overflows."""
    config = tiny(method="joint", lr=1e30, lr_min=1e30, grad_clip=0.0, ckpt_every=1, epochs=3)
    with pytest.raises(TrainingDiverged, match=r"non-finite (loss|gradient norm) at global step (\d+).*loss=") as info:
        train(config, sites3[:2], tmp_path, progress=False)
    failed_step = int(info.value.args[0].split("global step ")[1].split()[0])
    assert "last good checkpoint kept" in str(info.value)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["state"]["global_step"] == failed_step - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# The killed run computes as this process does: its thread count and oneDNN setting (tests/conftest.py's
# CROSSSITE_TEST_MKLDNN=0 switches oneDNN off here, and a child process does not read conftest).
_CHILD = """
import sys, torch
torch.set_num_threads({threads})
torch.backends.mkldnn.enabled = {mkldnn}
from crosssite.training import TrainConfig, train
from crosssite.data import load_sites
train(TrainConfig(**{config!r}), load_sites({specs!r}), {out!r}, progress=False)
"""


def test_resume_after_sigkill_matches_uninterrupted_run(sites3, tmp_path: Path) -> None:
    config = tiny(method="sepnorm-contrastive", epochs=3, ckpt_every=1, batch_per_site=2)
    reference = train(config, sites3[:2], tmp_path / "ref", progress=False)
    assert reference["steps"] // 3 >= 3  # steps per epoch: room to be killed inside an epoch

    out = tmp_path / "killed"
    code = _CHILD.format(threads=torch.get_num_threads(), mkldnn=torch.backends.mkldnn.enabled,
                         config=config.to_dict(), specs=SPECS[:2], out=str(out))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoints" / "last.pt"
    killed_at = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and child.poll() is None:
        if ckpt.is_file():
            state = load_checkpoint(ckpt)["state"]
            if state["step_in_epoch"] > 0:  # a mid-epoch checkpoint: kill the run somewhere after it
                os.kill(child.pid, signal.SIGKILL)
                killed_at = state
                break
        time.sleep(0.02)
    child.wait(timeout=30)
    assert killed_at is not None, f"child ended before a mid-epoch checkpoint: {child.stderr.read().decode()[-2000:]}"
    assert child.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()

    resumed = train(config, sites3[:2], out, resume=True, progress=False)
    assert resumed["steps"] == reference["steps"]  # the same number of optimiser steps in total
    final = load_checkpoint(ckpt)
    assert final["state"]["global_step"] == reference["steps"]
    ref_model = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(final["model"][k], ref_model[k]) for k in ref_model)  # and the same weights
    assert resumed["sites"] == reference["sites"]


def test_cli_train_end_to_end(tmp_path: Path) -> None:
    from crosssite.cli import app

    runner = CliRunner()
    config = tmp_path / "tiny.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in TINY.items()))
    out = tmp_path / "run"
    args = ["train", "--site", SPECS[0], "--site", SPECS[1], "--method", "sepnorm", "--out", str(out),
            "--config", str(config), "--set", "seed=1", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "s0" in result.output and "auc" in result.output
    saved = (out / "config.yaml").read_text()
    assert "method: sepnorm\n" in saved and "seed: 1\n" in saved and "image_size: 32\n" in saved
    again = runner.invoke(app, ["train", "--resume", str(out), "--quiet"])  # config and sites from the run
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["method"] == "sepnorm"
    bad = runner.invoke(app, args[:-3] + ["--set", "epochz=2"])
    assert bad.exit_code == 1 and "unknown config key 'epochz'" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_official_protocol_needs_an_official_split(sites3, tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="s0.*has no official split"):
        train(tiny(protocol="official"), sites3[:1], tmp_path, progress=False)


def test_recalibrate_bn_sets_plain_averages_and_keeps_weights() -> None:
    from crosssite.models import BatchNorm, create_model
    from crosssite.training.validation import recalibrate_bn

    model = create_model("covidnet_redesign", num_sites=2, width=0.0625, norm="batch", image_size=32)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    batches = [{"image": torch.randn(6, 3, 32, 32) * (1 + i), "site": torch.tensor([0, 1] * 3)} for i in range(2)]
    first = next(m for m in model.modules() if isinstance(m, BatchNorm))
    seen = []
    hook = first.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    model.eval()
    recalibrate_bn(model, batches, torch.device("cpu"), tiny())
    hook.remove()
    assert not model.training and first.momentum == 0.1  # mode and momentum restored
    expected_mean = torch.stack([x.mean((0, 2, 3)) for x in seen]).mean(0)
    expected_var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen]).mean(0)
    assert torch.allclose(first.slot.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    assert torch.allclose(first.slot.running_var, expected_var, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())


def test_bad_file_stops_the_run_unless_skip_bad(sites3, tmp_path: Path) -> None:
    import shutil

    from crosssite.errors import ImageReadError

    root = tmp_path / "site"
    root.mkdir()
    lines = ["path,label,patient"]
    for sample in sites3[0].samples:
        shutil.copy(sample.path, root / f"{sample.patient}_{sample.path.name}")
        lines.append(f"{sample.patient}_{sample.path.name},{'covid' if sample.label else 'non-covid'},{sample.patient}")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines.append("broken.png,covid,broken")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    root = root / "manifest.csv"
    spec = [f"bad={root}", SPECS[1]]
    with pytest.raises(ImageReadError, match="broken.png"):
        train(tiny(method="joint"), spec, tmp_path / "strict", progress=False)
    metrics = train(tiny(method="joint", skip_bad=True), spec, tmp_path / "lenient", progress=False)
    skipped = json.loads((tmp_path / "lenient" / "skipped.json").read_text())
    assert [Path(s["path"]).name for s in skipped] == ["broken.png"] and metrics["steps"] > 0

    from crosssite.cli import app

    base = ["train", *(a for s in spec for a in ("--site", s)), "--method", "joint", "--quiet",
            *(a for k, v in TINY.items() for a in ("--set", f"{k}={v}"))]
    strict = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "cli-strict")])
    assert strict.exit_code == 1 and "broken.png" in strict.output
    assert len(strict.output.strip().splitlines()) == 1
    lenient = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "cli-lenient"), "--skip-bad"])
    assert lenient.exit_code == 0, lenient.output
    assert "skipped 1 unreadable file(s)" in lenient.output
    assert (tmp_path / "cli-lenient" / "skipped.json").is_file()
