"""``crosssite federated`` (simulation on one machine) and ``federated-server`` / ``federated-client`` (gRPC).

    crosssite federated --site A=../shared/data/sars_cov2_ct --site B=../shared/data/covid_ct \\
        --rounds 20 --local-epochs 1 --strategy fedbn --out runs/fedbn [--set width=0.25 --set image_size=64]

    crosssite federated-server --address 127.0.0.1:8080 --clients 2 --rounds 20 --strategy fedbn --out runs/fl
    crosssite federated-client --site A=../shared/data/sars_cov2_ct --server 127.0.0.1:8080 --strategy fedbn \\
        --out runs/fl [--set width=0.25 ...]          # on each hospital's machine, one per site

Training options (``--config`` / ``--set``, as for ``crosssite train``) belong to the clients: every client must
use the same backbone, width and method (the server stops with a message naming the clients otherwise). The
server decides the rounds, local epochs and strategy and sends them with every round. Needs the optional
dependency: ``pip install 'crosssite[federated]'``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import typer

from crosssite.cli.app import app, fail
from crosssite.errors import CrossSiteError

__all__ = ["federated_command", "federated_server_command", "federated_client_command"]

_STRATEGY_HELP = "fedbn (batch norms stay local), fedavg, or fedprox."
# the paper's method by default: `crosssite train`'s default method has no federated form
_DEFAULT_METHOD = "sepnorm-contrastive"
_METHOD_HELP = (f"A method registered with federated=True (default {_DEFAULT_METHOD}); `crosssite models "
                "--architectures` lists them.")


def _require_flower() -> None:
    if importlib.util.find_spec("flwr") is None:
        raise CrossSiteError("federated training needs Flower: pip install 'crosssite[federated]'")


def _config(config_file: Path | None, method: str | None, overrides: list[str]) -> Any:
    from crosssite.training import load_config
    from crosssite.training.config import apply_overrides, parse_overrides

    options = {"method": method or _DEFAULT_METHOD} if method or config_file is None else {}
    return apply_overrides(load_config(config_file), options | parse_overrides(overrides))


def _print_sites(result: dict[str, Any], out: Path) -> None:
    for name, site in result["sites"].items():
        val, test = site["val"], site["test"]
        typer.echo(f"{name}: best round {site['best_round']}, val AUC {_fmt(val['auc'])}, test AUC "
                   f"{_fmt(test['auc'])}, test accuracy {_fmt(test['accuracy'])}")
    typer.echo(f"output: {out}  (rounds.csv, metrics.json, <site>/model.safetensors)")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@app.command("federated")
def federated_command(
    site: list[str] = typer.Option(..., "--site", help="NAME=PATH[:LAYOUT] (repeat; one client per site)."),
    out: Path = typer.Option(..., "--out", help="Output folder (new)."),
    rounds: int = typer.Option(10, "--rounds", min=1, help="Federated rounds."),
    local_epochs: int = typer.Option(1, "--local-epochs", min=1, help="Local epochs per round."),
    strategy: str = typer.Option("fedbn", "--strategy", help=_STRATEGY_HELP),
    mu: float = typer.Option(0.01, "--mu", min=0.0, help="FedProx proximal weight."),
    method: str = typer.Option(None, "--method", help=_METHOD_HELP),
    config: Path = typer.Option(None, "--config", help="YAML file of training config keys."),
    set_: list[str] = typer.Option(None, "--set", help="key=value training config override (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", help="Only the final per-site lines."),
) -> None:
    """Federated training of one client per site in Flower's simulation engine on this machine."""
    try:
        _require_flower()
        from crosssite.federated import run_federated

        result = run_federated(_config(config, method, set_ or []), site, out, strategy=strategy, rounds=rounds,
                               local_epochs=local_epochs, mu=mu, progress=not quiet)
    except CrossSiteError as error:
        raise fail(error) from None
    _print_sites(result, out)


@app.command("federated-server")
def federated_server_command(
    address: str = typer.Option("127.0.0.1:8080", "--address", help="host:port to listen on."),
    clients: int = typer.Option(..., "--clients", min=1, help="Clients to wait for before the first round."),
    rounds: int = typer.Option(10, "--rounds", min=1, help="Federated rounds."),
    local_epochs: int = typer.Option(1, "--local-epochs", min=1, help="Local epochs per round."),
    strategy: str = typer.Option("fedbn", "--strategy", help=_STRATEGY_HELP),
    mu: float = typer.Option(0.01, "--mu", min=0.0, help="FedProx proximal weight."),
    round_timeout: float = typer.Option(None, "--round-timeout", help="Seconds before a round goes on without "
                                        "the clients that have not answered (default: wait)."),
    out: Path = typer.Option(None, "--out", help="Folder for rounds.csv (default: no file)."),
) -> None:
    """Serve federated rounds to clients over gRPC; sees only the shared weights, never images or local BN."""
    try:
        _require_flower()
        from crosssite.federated import make_strategy, run_server

        logger = make_strategy(strategy, rounds=rounds, local_epochs=local_epochs, min_clients=clients, mu=mu,
                               out_dir=out)
        run_server(address, logger, round_timeout)
    except CrossSiteError as error:
        raise fail(error) from None
    typer.echo(f"server finished {logger.completed_rounds} rounds; {len(logger.failures)} client failure(s)")


@app.command("federated-client")
def federated_client_command(
    site: str = typer.Option(..., "--site", help="NAME=PATH[:LAYOUT] of this client's site."),
    server: str = typer.Option("127.0.0.1:8080", "--server", help="host:port of the federated server."),
    out: Path = typer.Option(..., "--out", help="Folder; this client writes OUT/<site name>/."),
    strategy: str = typer.Option("fedbn", "--strategy", help=_STRATEGY_HELP + " Must match the server's."),
    method: str = typer.Option(None, "--method", help=_METHOD_HELP),
    config: Path = typer.Option(None, "--config", help="YAML file of training config keys."),
    set_: list[str] = typer.Option(None, "--set", help="key=value training config override (repeatable)."),
    wait: float = typer.Option(60.0, "--wait", help="Seconds to keep retrying while the server is not up."),
) -> None:
    """Train one site as a client of a federated server; at the end score this site's best model."""
    try:
        _require_flower()
        from flwr.client import start_client

        from crosssite.data import load_sites
        from crosssite.federated import SiteClient

        (loaded,) = load_sites([site])
        client = SiteClient(_config(config, method, set_ or []), loaded, out, strategy)
        split = client.data.splits[0]  # load and split the site before connecting
        typer.echo(f"{loaded.name}: {len(split.train)} training / {len(split.val)} validation / {len(split.test)} "
                   f"test slices; server {server}")
        start_client(server_address=server, client=client.to_client(), insecure=True, max_wait_time=wait)
        result = client.finish()
    except CrossSiteError as error:
        raise fail(error) from None
    _print_sites({"sites": {loaded.name: result}}, out)
