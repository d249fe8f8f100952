"""`run_federated`: every site's client and the server on one machine, in Flower's simulation engine (Ray).

    from crosssite.federated import run_federated
    result = run_federated(TrainConfig(width=0.25, image_size=64), ["a=../shared/data/sars_cov2_ct",
                           "b=../shared/data/covid_ct"], "runs/fedbn", strategy="fedbn", rounds=20, local_epochs=1)

The output folder holds ``federated.json`` (the run's settings and sites), ``rounds.csv`` (per round and site:
local loss, validation AUC and accuracy, failures), ``metrics.json`` (per site: validation and test metrics of
the site's best model) and one client folder per site (see `crosssite.federated.client`), whose
``model.safetensors`` `crosssite evaluate` and `crosssite predict` accept like any other model file. The same
client and strategy code runs as separate processes over gRPC (`crosssite federated-server` /
`crosssite federated-client`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from crosssite.data import Site, load_sites
from crosssite.errors import ConfigError
from crosssite.federated.client import SiteClient
from crosssite.federated.common import FederatedError
from crosssite.federated.server import RoundLogger, make_strategy
from crosssite.training.config import TrainConfig, save_config, with_recipe
from crosssite.ioutil import ensure_dir
from crosssite.rundir import json_safe, site_spec, write_json
from crosssite.rundir import federated_started, undo_failed_start

__all__ = ["run_federated", "summarise"]


def run_federated(
    config: TrainConfig,
    sites: Sequence[Site | str],
    out_dir: str | Path,
    *,
    strategy: str = "fedbn",
    rounds: int = 10,
    local_epochs: int = 1,
    mu: float = 0.01,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``rounds`` federated rounds over ``sites`` (one Flower client each) and score every site's model.

    Returns what ``metrics.json`` holds: the settings, per site the best model's validation and test metrics,
    and the per-round log. A folder that already holds a federated run is an error (Flower's engine cannot
    continue a run; start a new folder).
    """
    sites = load_sites(sites)
    config = with_recipe(config)  # what every client trains and config.yaml records
    out = Path(out_dir)
    if (out / "federated.json").is_file():
        raise FederatedError(f"{out}: already holds a federated run; use a new folder")
    if len({s.name for s in sites}) != len(sites):
        raise ConfigError(f"site names must be unique, got {[s.name for s in sites]}")
    with undo_failed_start(out, federated_started):
        return _simulate(config, sites, out, strategy, rounds, local_epochs, mu, progress)


def _simulate(config: TrainConfig, sites: list[Site], out: Path, strategy: str, rounds: int, local_epochs: int,
              mu: float, progress: bool) -> dict[str, Any]:
    """Check and load every site here, then run the rounds in Flower's engine and summarise them."""
    from flwr.client import ClientApp
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.simulation import run_simulation

    names = [s.name for s in sites]
    for site in sites:  # fail on a bad method, strategy or image here, as central training does, not in a worker
        _ = SiteClient(config, site, out, strategy).data
    logger = make_strategy(strategy, rounds=rounds, local_epochs=local_epochs, min_clients=len(sites), mu=mu,
                           out_dir=out, expected_sites=names, echo=print if progress else None)
    ensure_dir(out)
    settings = {"strategy": strategy, "rounds": rounds, "local_epochs": local_epochs, "mu": mu,
                "engine": "flower simulation", "sites": [site_spec(s) for s in sites]}
    write_json(out / "federated.json", settings)
    save_config(config, out / "config.yaml")

    def client_fn(context: Any) -> Any:
        torch.set_num_threads(1)  # one core per client; the engine runs clients side by side
        return SiteClient(config, sites[int(context.node_config["partition-id"])], out, strategy).to_client()

    def server_fn(context: Any) -> ServerAppComponents:
        return ServerAppComponents(strategy=logger, config=ServerConfig(num_rounds=rounds))

    gpus = 1.0 / len(sites) if config.device != "cpu" and torch.cuda.is_available() else 0.0
    flower_level = logging.getLogger("flwr").level
    if not progress:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        run_simulation(
            server_app=ServerApp(server_fn=server_fn),
            client_app=ClientApp(client_fn=client_fn),
            num_supernodes=len(sites),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": gpus},
                            "init_args": {"log_to_driver": progress, "include_dashboard": False}},
        )
    finally:
        logging.getLogger("flwr").setLevel(flower_level)
    return summarise(logger, [SiteClient(config, s, out, strategy) for s in sites], out, settings)


def summarise(logger: RoundLogger, clients: list[SiteClient], out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Check the run finished, score every site's best model, write ``metrics.json``; return its content."""
    if logger.completed_rounds < logger.rounds:
        failures = "; ".join(f"round {r}: {text}" for r, text in logger.failures[-3:]) or "no failure was reported"
        raise FederatedError(f"the federated run stopped after {logger.completed_rounds} of {logger.rounds} "
                             f"rounds ({failures}); see {out / 'rounds.csv'}")
    per_site = {client.site.name: client.finish() for client in clients}
    result = json_safe({**settings, "method": f"federated-{logger.strategy}", "failures": len(logger.failures),
                        "sites": per_site, "rounds_log": logger.rows})
    write_json(out / "metrics.json", result)
    return result

