"""The typer application every command module registers on."""

from __future__ import annotations

import typer

from crosssite.errors import CrossSiteError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Cross-site COVID-19 CT classification (Wang, Liu, Dou, IEEE JBHI 2020).",
)


@app.callback()
def _root() -> None:
    """Cross-site COVID-19 CT classification (Wang, Liu, Dou, IEEE JBHI 2020)."""


def fail(error: CrossSiteError | str) -> typer.Exit:
    """Print ``error`` as one line on stderr and return the exit (status 1) to raise: never a traceback."""
    typer.echo(f"error: {' '.join(str(error).split())}", err=True)
    return typer.Exit(1)
