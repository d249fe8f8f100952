"""The `crosssite` command line: one module per command group, all registering on one typer app."""

from __future__ import annotations

import typer

from crosssite.cli import add_site, bench, data, dicom_node, evaluate, experiment, federated, models, predict, serve, train  # noqa: F401,E501  (register on `app`)
from crosssite.cli.app import app


@app.command()
def version() -> None:
    """Print the package version."""
    from crosssite import __version__

    typer.echo(__version__)


def main() -> None:
    app()
