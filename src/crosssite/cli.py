"""The `crosssite` command line."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Cross-site COVID-19 CT classification.")


@app.command()
def version() -> None:
    """Print the package version."""
    from crosssite import __version__

    typer.echo(__version__)


def main() -> None:
    app()
