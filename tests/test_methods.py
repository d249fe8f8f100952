"""The method registry: a tenth method is one entry, and the loop, the grid, the report and the CLI pick it up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.nn.functional as F
from typer.testing import CliRunner

from crosssite.cli import app
from crosssite.data import load_sites
from crosssite.experiment import run_experiment
from crosssite.reporting import ROWS, load_results, table_one
from crosssite.training import METHODS, PAPER_TABLE_I, LossTerm, Method, TrainConfig, compute_loss
from crosssite.training.methods import CONTRASTIVE, register_method

SITES = ("near=synthetic:shift=0.0,n=16,seed=3,size=40", "far=synthetic:shift=1.5,n=16,seed=4,size=40")
# BN recalibration kept on (the cpu preset no longer has it): a 1-epoch run without it can collapse to a constant
TINY = {"image_size": 32, "width": 0.0625, "epochs": 1, "batch_per_site": 4, "ckpt_every": 0, "folds": 2,
        "bn_recalibrate": True}


def _smoothing(out, labels, config, gather):
    """Uniform-label cross-entropy: with weight w, CE + w * this is label smoothing."""
    return {"smooth": -F.log_softmax(out.logits.float(), 1).mean()}


TOY = Method("joint-smooth", "joint + label smoothing (a test's toy method)", norm="batch",
             terms=(LossTerm("smoothing", _smoothing, lambda config: {"smooth": 0.1}),))


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Method:
    monkeypatch.setitem(METHODS, TOY.name, TOY)
    return TOY


def test_the_paper_rows_come_from_the_registry() -> None:
    assert [(r.method, r.backbone) for r in ROWS] == list(PAPER_TABLE_I)
    assert all(row.method in METHODS for row in ROWS)
    with pytest.raises(ValueError, match="twice"):
        register_method(METHODS["joint"])
    assert METHODS["sepnorm-contrastive"].terms == (CONTRASTIVE,) and METHODS["sepnorm-contrastive"].federated


def test_a_toy_method_runs_through_the_grid_and_the_report(toy: Method, tmp_path: Path) -> None:
    assert TrainConfig(method=toy.name).method == toy.name  # the config accepts it
    ran = run_experiment(load_sites(SITES), tmp_path, rows=[(toy.name, "covidnet_redesign")], folds=2,
                         only_folds=[0], overrides=TINY, progress=False, log=lambda _: None)
    assert len(ran) == 1
    run = tmp_path / "runs" / f"{toy.name}__covidnet_redesign" / "fold0_seed0"
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    assert "smooth" in header and "ce" in header  # the new term is logged like the paper's
    card = json.loads((run / "model.json").read_text())
    assert card["model_args"]["norm"] == "batch"
    runs, _ = load_results(tmp_path / "results.jsonl")
    table = table_one(runs, ["near", "far"])
    (row,) = [r for r in table.body if r[0].startswith(toy.name)]
    assert row[1] == "1" and row[-1] == "–"  # one run; no paper number


def test_the_cli_runs_a_registered_method_by_name(toy: Method, tmp_path: Path) -> None:
    args = ["experiment", "--out", str(tmp_path), "--methods", toy.name, "--fold", "0", "--folds", "2",
            "--no-report", "--quiet"] + [a for s in SITES for a in ("--site", s)]
    args += [a for k, v in TINY.items() if k != "folds" for a in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert (line["method"], line["backbone"]) == (toy.name, "covidnet_redesign")


def test_compute_loss_weights_every_part_of_every_term(toy: Method) -> None:
    import torch

    from crosssite.models import ModelOutput

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    out = ModelOutput(logits=logits, embedding=torch.zeros(2, 4), projection=None, aux_logits=None)
    labels = torch.tensor([0, 1])
    total, parts = compute_loss(out, labels, toy, TrainConfig())
    assert set(parts) == {"ce", "smooth"}
    assert float(total) == pytest.approx(float(parts["ce"] + 0.1 * parts["smooth"]))
