"""The Flower client of one site: local training with the package's training step, validation, model files.

A `SiteClient` owns one site's images and never sends them anywhere. Per round it receives the shared weights,
loads them into its own model (whose batch norms it keeps under FedBN), trains ``local_epochs`` epochs on its
training part with the same `crosssite.training.engine.train_step` that central training uses (cross-entropy,
plus the supervised contrastive term computed on the client's own batch, plus FedProx's proximal term), and
returns the shared weights. On evaluation it scores its validation part and keeps its best model as a normal
model file. Everything it writes goes to ``OUT/<site name>/``:

    split.json                train / val / test files of the site (fixed by fold and split_seed)
    state.pt                  the client's full model between rounds (its own batch norms included)
    log.csv                   one row per round: local training loss, validation metrics
    model.safetensors/.json   the best round's model (highest validation AUC): shared weights + its own BN
    metrics.json              validation and test metrics of that model (after the last round, `finish`)
    predictions.csv           its P(COVID) for every validation and test slice

The client object holds no state between calls that matters: Flower's simulation engine may build a fresh client
for every message (in any worker process), so what must survive a round lives in the files above.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.client import NumPyClient
from torch import Tensor, nn

from crosssite import models
from crosssite.data import Site
from crosssite.errors import ConfigError
from crosssite.federated.common import federated_methods, STRATEGIES, FederatedError, shared_keys
from crosssite.ioutil import atomic_write_bytes
from crosssite.training.config import TrainConfig, save_config, with_recipe
from crosssite.training.data import RunData, build_run_data
from crosssite.training.engine import TrainingDiverged
from crosssite.rundir import json_safe, model_card, write_json, write_predictions, write_run_files
from crosssite.training.step import epoch_steps, learning_rate, make_optimizer, resolve_device, train_step
from crosssite.training.validation import score_part
from crosssite.training.methods import METHODS, model_kwargs
from crosssite.training.progress import write_log_csv

__all__ = ["SiteClient", "build_site_model"]

STATE = "state.pt"
MODEL_STEM = "model"

# Loaded site data per (site directory, configuration), reused across the rounds a worker process serves.
_DATA: dict[tuple[str, str], RunData] = {}


def build_site_model(config: TrainConfig) -> nn.Module:
    """A one-site model of ``config.backbone`` for ``config.method``, initialised from ``config.seed`` (so every
    client starts from the same weights)."""
    torch.manual_seed(config.seed)
    kwargs = model_kwargs(METHODS[config.method], config.backbone, num_sites=1, width=config.width,
                          block_act=config.block_act, init=config.init, mixstyle=config.mixstyle,
                          standardise_input=config.standardise_input, image_size=config.image_size)
    return models.create_model(config.backbone, **kwargs)


class SiteClient(NumPyClient):
    """Flower client of ``site``: trains and validates locally, exchanges only the weights of `shared_keys`."""

    def __init__(self, config: TrainConfig, site: Site, out_dir: str | Path, strategy: str) -> None:
        if not METHODS[config.method].federated:
            raise ConfigError(f"method: federated training supports {', '.join(federated_methods())}, "
                              f"got {config.method!r}")
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy: unknown {strategy!r}; valid: {', '.join(STRATEGIES)}")
        self.config, self.site, self.strategy = with_recipe(config), site, strategy
        self.dir = Path(out_dir) / site.name
        self.device = resolve_device(config.device)

    # ------------------------------------------------------------------------------------------ state

    @property
    def data(self) -> RunData:
        key = (str(self.dir.resolve()), json.dumps(self.config.to_dict(), sort_keys=True))
        if key not in _DATA:
            split_file = self.dir / "split.json"
            new_split = not split_file.is_file()
            data = build_run_data(self.config, [self.site], split_file, reuse_split=not new_split, device=self.device)
            write_run_files(self.dir, data.sites, data.splits, data.cache, new_split=new_split,
                            prefix=f"{self.site.name}: ")
            if new_split:
                save_config(self.config, self.dir / "config.yaml")
            _DATA[key] = data
        return _DATA[key]

    def _load(self, parameters: list[np.ndarray] | None) -> tuple[nn.Module, list[dict[str, Any]], float]:
        """The client's model -- its own state from the last round (or the common initialisation) with the
        received shared weights (if any) over it --, its per-round history and its best validation score."""
        model = build_site_model(self.config)
        history, best = [], -math.inf
        path = self.dir / STATE
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["model"])
            history, best = list(saved["history"]), float(saved["best"])
        if parameters is not None:
            self._load_shared(model, parameters)
        return model.to(self.device), history, best

    def _save_state(self, model: nn.Module, history: list[dict[str, Any]], best: float) -> None:
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "history": history, "best": best}, buffer)
        atomic_write_bytes(self.dir / STATE, buffer.getvalue())

    def _keys(self, model: nn.Module) -> list[str]:
        return shared_keys(model, self.strategy)

    def _load_shared(self, model: nn.Module, parameters: list[np.ndarray]) -> None:
        keys = self._keys(model)
        if len(parameters) != len(keys):
            raise FederatedError(f"site {self.site.name!r}: the server sent {len(parameters)} arrays, this client "
                                 f"shares {len(keys)} under {self.strategy}: do server and clients use the same "
                                 "strategy, backbone and width?")
        state = model.state_dict()
        with torch.no_grad():
            for key, array in zip(keys, parameters):
                if tuple(array.shape) != tuple(state[key].shape):
                    raise FederatedError(f"site {self.site.name!r}: array for {key} has shape {array.shape}, "
                                         f"the model's is {tuple(state[key].shape)}")
                state[key].copy_(torch.from_numpy(np.asarray(array)))

    def _check_round(self, config: dict[str, Any]) -> None:
        sent = config.get("strategy")
        if sent is not None and sent != self.strategy:
            raise FederatedError(f"site {self.site.name!r}: the server runs {sent}, this client was started "
                                 f"with --strategy {self.strategy}")

    # ----------------------------------------------------------------------------------- Flower API

    def _arrays(self, model: nn.Module) -> list[np.ndarray]:
        """The shared entries of ``model``'s state, as sent to the server."""
        state = model.state_dict()
        return [state[key].detach().cpu().numpy() for key in self._keys(model)]

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return self._arrays(self._load(None)[0])

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        """Train ``local_epochs`` epochs from the received shared weights (+ this site's own batch norms)."""
        self._check_round(config)
        rnd, rounds, local_epochs = int(config["server_round"]), int(config["rounds"]), int(config["local_epochs"])
        mu = float(config.get("proximal_mu", 0.0))
        c, data = self.config, self.data
        model, history, best = self._load(parameters)
        method = METHODS[c.method]
        optimizer = make_optimizer(model, c)
        anchors = _proximal_anchors(model, self._keys(model)) if mu > 0 else []
        penalty = (lambda: 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in anchors)) if anchors else None
        steps_per_epoch = data.steps_per_epoch
        torch.manual_seed(zlib.crc32(f"{c.seed}/{self.site.name}/{rnd}".encode()))
        model.train()
        sums: dict[str, float] = {}
        steps = 0
        for e in range(local_epochs):
            epoch = (rnd - 1) * local_epochs + e

            def step(batch: dict[str, Tensor], i: int, epoch: int = epoch) -> dict[str, float]:
                lr = learning_rate(c, epoch * steps_per_epoch + i, steps_per_epoch, rounds * local_epochs)
                return train_step(model, model, optimizer, batch, method, c, self.device, lr=lr,
                                  on_diverged=self._diverged(rnd, epoch), penalty=penalty)

            for _, values in epoch_steps(data.train, epoch, 0, step):
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        losses = {f"train_{k}": v / max(steps, 1) for k, v in sums.items()}
        history.append({"round": rnd, **losses})
        self._save_state(model, history, best)
        metrics = {"site": self.site.name, **losses, "keys": ",".join(self._keys(model))}
        return self._arrays(model), len(data.splits[0].train), metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        """Validation metrics of the received shared weights with this site's own batch norms; keeps the best."""
        self._check_round(config)
        rnd = int(config.get("server_round", 0))
        model, history, best = self._load(parameters)
        model.eval()
        val, rows = score_part(model, self.data, "val", self.device, self.config)
        metrics = val[self.site.name]
        row = next((r for r in history if r["round"] == rnd), None)
        if row is None:
            row = {"round": rnd}
            history.append(row)
        row.update({f"val_{k}": v for k, v in metrics.items()})
        auc = metrics["auc"] if not math.isnan(metrics["auc"]) else metrics["accuracy"]
        if auc > best:
            best = auc
            card = model_card(self.config.to_dict(), [self.site.name],
                              f"federated-{self.strategy} ({self.config.method})",
                              {"val": {self.site.name: metrics}, "round": rnd,
                               "selection": "validation AUC of this site"}, self.data.mean, self.data.std)
            models.save(model, self.dir / MODEL_STEM, card)
        self._save_state(model, history, best)
        write_log_csv(self.dir / "log.csv", history)
        loss = _log_loss(rows)
        safe = {k: (v if math.isfinite(v) else -1.0) for k, v in metrics.items()}
        return loss, len(rows), {"site": self.site.name, **safe}

    # -------------------------------------------------------------------------------------- results

    def finish(self) -> dict[str, Any]:
        """Validation and test metrics of this site's best model; writes ``metrics.json`` and predictions."""
        if not models.model_paths(self.dir / MODEL_STEM)[0].is_file():
            raise FederatedError(f"site {self.site.name!r}: no model was saved in {self.dir} (no round was "
                                 "evaluated)")
        best, card = models.load(self.dir / MODEL_STEM, map_location=self.device)
        val, val_rows = score_part(best, self.data, "val", self.device, self.config)
        test, test_rows = score_part(best, self.data, "test", self.device, self.config)
        split = self.data.splits[0]
        name = self.site.name
        result = json_safe({
            "method": card["method"], "strategy": self.strategy, "backbone": self.config.backbone,
            "fold": self.config.fold, "seed": self.config.seed, "best_round": card["metrics"]["round"],
            "n_train": int(len(split.train)), "n_val": int(len(split.val)), "n_test": int(len(split.test)),
            "val": val[name], "test": test[name],
        })
        write_predictions(self.dir / "predictions.csv", val_rows + test_rows)
        write_json(self.dir / "metrics.json", result)
        return result

    def _diverged(self, rnd: int, epoch: int) -> Any:
        def raise_(what: str, values: dict[str, float]) -> None:
            parts = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise TrainingDiverged(f"site {self.site.name!r}: non-finite {what} in round {rnd} (local epoch "
                                   f"{epoch + 1}): {parts}")
        return raise_


def _proximal_anchors(model: nn.Module, keys: list[str]) -> list[tuple[Tensor, Tensor]]:
    """(parameter, frozen copy of the received value) for every trainable shared parameter (FedProx)."""
    shared = set(keys)
    return [(p, p.detach().clone()) for name, p in model.named_parameters() if name in shared]


def _log_loss(rows: list[dict[str, Any]]) -> float:
    """Mean binary cross-entropy of the validation predictions (Flower's evaluation loss)."""
    if not rows:
        return float("nan")
    p = np.clip(np.array([r["p_covid"] for r in rows]), 1e-7, 1 - 1e-7)
    y = np.array([r["label"] for r in rows])
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
