"""`scripts/ship_model.py`'s cross-validated estimate: taken only from a grid's runs of the card's method, backbone
and frame, since a grid of another frame estimates another model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ship_model.py"


def _module():
    spec = importlib.util.spec_from_file_location("ship_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(fold: int, frame: str | None, auc: float) -> dict:
    config = {} if frame is None else {"frame": frame}
    return {"method": "crosssite", "backbone": "covidnet_redesign", "fold": fold, "seed": 0, "config": config,
            "sites": {"a": {"auc": auc}}}


def test_the_estimate_comes_only_from_runs_of_the_same_frame(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    rows = [_run(0, "pad", 0.90), _run(1, None, 0.80), _run(0, "canonical-aerated", 0.70),
            _run(1, "canonical-aerated", 0.60)]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ship = _module()
    card = {"method": "crosssite", "architecture": "covidnet_redesign", "train_config": {"frame": "pad"}}
    pad = ship.cross_validated(results, card)  # a run without a frame in its config was trained on the default, pad
    assert pad["runs"] == 2 and pad["test_auc_mean"] == {"a": 85.0}
    canonical = ship.cross_validated(results, card | {"train_config": {"frame": "canonical-aerated"}})
    assert canonical["runs"] == 2 and canonical["test_auc_mean"] == {"a": 65.0}
    none = ship.cross_validated(results, card | {"train_config": {"frame": "canonical-lungs"}})
    assert none["runs"] == 0 and "canonical-lungs" in none["note"]
