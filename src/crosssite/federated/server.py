"""The Flower server side: Flower's own FedAvg / FedProx, wrapped to log every round per site.

`RoundLogger` delegates every decision (sampling, aggregation, failure handling) to the Flower strategy it wraps
and only watches: per round it records which sites trained, their local losses, their validation metrics, and
every failure, prints one line, and rewrites ``OUT/rounds.csv`` and ``OUT/server.json`` (the audit of what the
server received from each site each round: array count, value count and weight names) atomically. Results are
aggregated in site-name order, so the average does not depend on which client answered first. It also checks
what arrives before Flower averages it: clients that send different numbers or shapes of arrays (different
backbone, width or strategy) stop the run with a message naming them, instead of a numpy error inside the
aggregation.

``fedbn`` runs Flower's plain FedAvg on the server: keeping batch norms local is the clients' part (see
`crosssite.federated.client`), the server only ever sees the shared weights. Rounds after the first go on with
the clients that are still connected (at least one), so a site that disconnects is reported, not waited for.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server import ClientManager, ServerConfig, start_server
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, FedProx, Strategy

from crosssite.errors import ConfigError
from crosssite.federated.common import STRATEGIES, FederatedError
from crosssite.ioutil import atomic_write_text

__all__ = ["RoundLogger", "make_strategy", "run_server", "weighted_means"]

_COLUMNS = ("round", "site", "status", "train_loss", "val_auc", "val_accuracy", "n_train", "n_val", "detail")


def _short(failure: BaseException | tuple[ClientProxy, Any]) -> str:
    """A failure as one short line (Flower wraps a client's exception in a long message)."""
    text = " ".join(str(failure[1] if isinstance(failure, tuple) else failure).split())
    kind = type(failure).__name__ if not isinstance(failure, tuple) else "error result"
    return f"{kind}: {text[-240:]}" if text else kind


class RoundLogger(Strategy):
    """Wraps a Flower strategy; logs per round and per site what it trained, validated and lost."""

    def __init__(self, inner: FedAvg, strategy: str, rounds: int, local_epochs: int, out_dir: Path | None,
                 expected_sites: list[str] | None = None, echo: Callable[[str], None] | None = print) -> None:
        self.inner, self.strategy, self.rounds, self.local_epochs = inner, strategy, rounds, local_epochs
        self.out_dir, self.expected, self.echo = out_dir, expected_sites, echo
        self.rows: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []  # per round and site: what the server got (array count, keys)
        self.completed_rounds = 0
        self.failures: list[tuple[int, str]] = []

    def __repr__(self) -> str:
        return f"RoundLogger({self.strategy}, {self.inner!r})"

    # --------------------------------------------------------------------------------- delegation

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        if server_round > 1:  # go on with whoever is still connected
            self.inner.min_fit_clients = self.inner.min_available_clients = 1
            self.inner.min_evaluate_clients = 1
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config.update(self._round_config(server_round))
        return instructions

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        instructions = self.inner.configure_evaluate(server_round, parameters, client_manager)
        for _, ins in instructions:
            ins.config.update(self._round_config(server_round))
        return instructions

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)

    def _round_config(self, server_round: int) -> dict[str, Scalar]:
        return {"server_round": server_round, "rounds": self.rounds, "local_epochs": self.local_epochs,
                "strategy": self.strategy}

    # -------------------------------------------------------------------------------- aggregation

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self._check_arrays(server_round, results)
        results = sorted(results, key=lambda r: str(r[1].metrics.get("site", "")))  # arrival order must not matter
        for _, res in results:
            self._row(server_round, str(res.metrics.get("site", "?")), status="trained",
                      train_loss=res.metrics.get("train_loss"), n_train=res.num_examples)
        for failure in failures:
            self.failures.append((server_round, _short(failure)))
            self._row(server_round, "?", status="failed (fit)", detail=_short(failure))
        if not results:
            raise FederatedError(f"round {server_round}: no client returned a result ({len(failures)} failed)")
        return self.inner.aggregate_fit(server_round, results, failures)

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        for _, res in results:
            row = self._row(server_round, str(res.metrics.get("site", "?")))
            row.update(val_auc=res.metrics.get("auc"), val_accuracy=res.metrics.get("accuracy"), n_val=res.num_examples)
        for failure in failures:
            self.failures.append((server_round, _short(failure)))
            self._row(server_round, "?", status="failed (evaluate)", detail=_short(failure))
        self._mark_absent(server_round)
        self.completed_rounds = server_round
        self._report(server_round)
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def _check_arrays(self, server_round: int, results: list[tuple[ClientProxy, FitRes]]) -> None:
        shapes: dict[str, list[tuple[int, ...]]] = {}
        for _, res in results:
            site = str(res.metrics.get("site", "?"))
            arrays = parameters_to_ndarrays(res.parameters)
            shapes[site] = [a.shape for a in arrays]
            keys = str(res.metrics.get("keys", "")).split(",") if res.metrics.get("keys") else []
            self.received.append({"round": server_round, "site": site, "arrays": len(arrays),
                                  "values": int(sum(a.size for a in arrays)), "keys": keys})
        if len({tuple(s) for s in shapes.values()}) > 1:
            summary = "; ".join(f"{site}: {len(s)} arrays, {sum(math.prod(x) for x in s)} values"
                                for site, s in shapes.items())
            raise FederatedError(f"round {server_round}: clients send different weights ({summary}); start every "
                                 "client with the same backbone, width, method and strategy")

    # ------------------------------------------------------------------------------------ logging

    def _row(self, server_round: int, site: str, **values: Any) -> dict[str, Any]:
        for row in self.rows:
            if row["round"] == server_round and row["site"] == site and site != "?":
                row.update({k: v for k, v in values.items() if v is not None})
                return row
        row = {"round": server_round, "site": site, "status": "trained"} | values
        self.rows.append(row)
        return row

    def _mark_absent(self, server_round: int) -> None:
        """Sites expected (given, or seen in an earlier round) that neither trained nor failed visibly."""
        seen = {r["site"] for r in self.rows if r["round"] == server_round}
        expected = self.expected or sorted({r["site"] for r in self.rows if r["site"] != "?"})
        for site in expected:
            if site not in seen:
                self._row(server_round, site, status="absent", detail="did not train this round")

    def _report(self, server_round: int) -> None:
        mine = [r for r in self.rows if r["round"] == server_round]
        parts = []
        for r in mine:
            if r["status"] == "trained":
                parts.append(f"{r['site']}: loss {_fmt(r.get('train_loss'))} val AUC {_fmt(r.get('val_auc'))}")
            else:
                parts.append(f"{r['site']}: {r['status']}")
        if self.echo is not None:
            self.echo(f"round {server_round}/{self.rounds} [{self.strategy}]  " + "  |  ".join(parts))
        if self.out_dir is not None:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, _COLUMNS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / "rounds.csv", buffer.getvalue())
            audit = {"strategy": self.strategy, "rounds": self.rounds, "completed_rounds": self.completed_rounds,
                     "failures": [{"round": r, "error": text} for r, text in self.failures],
                     "received": self.received}
            atomic_write_text(self.out_dir / "server.json", json.dumps(audit, indent=1) + "\n")


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and value < 0) else f"{float(value):.3f}"


def weighted_means(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Example-weighted mean over clients of every numeric metric (Flower's round-level summary)."""
    total = sum(n for n, _ in results) or 1
    names = {k for _, m in results for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: sum(n * float(m[k]) for n, m in results if k in m) / total for k in sorted(names)}


def make_strategy(strategy: str, *, rounds: int, local_epochs: int, min_clients: int, mu: float = 0.01,
                  out_dir: Path | None = None, expected_sites: list[str] | None = None,
                  echo: Callable[[str], None] | None = print) -> RoundLogger:
    """Flower's FedAvg (``fedbn``, ``fedavg``) or FedProx (``fedprox``, proximal weight ``mu``), every client
    trained and validated every round, wrapped in a `RoundLogger`. Initial weights come from one client (all
    clients initialise identically from the configured seed)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: unknown {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if rounds < 1 or local_epochs < 1 or min_clients < 1:
        raise ConfigError("rounds, local epochs and the number of clients must be >= 1")
    options = dict(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=min_clients,
                   min_evaluate_clients=min_clients, min_available_clients=min_clients, accept_failures=True,
                   fit_metrics_aggregation_fn=weighted_means, evaluate_metrics_aggregation_fn=weighted_means)
    inner = FedProx(proximal_mu=mu, **options) if strategy == "fedprox" else FedAvg(**options)
    return RoundLogger(inner, strategy, rounds, local_epochs, out_dir, expected_sites, echo)


def run_server(address: str, strategy: RoundLogger, round_timeout: float | None = None) -> RoundLogger:
    """Serve ``strategy.rounds`` rounds to clients connecting over gRPC at ``address`` (``host:port``)."""
    start_server(server_address=address, strategy=strategy,
                 config=ServerConfig(num_rounds=strategy.rounds, round_timeout=round_timeout))
    if strategy.completed_rounds < strategy.rounds:
        raise FederatedError(f"the server stopped after {strategy.completed_rounds} of {strategy.rounds} rounds")
    return strategy
