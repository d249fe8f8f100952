"""The typer application every command module registers on.

Its group (`GuardedGroup`) is the one place where errors become messages: a `CrossSiteError` raised by any command
(or sub-command), and an `OSError` on an output (see `crosssite.ioutil.OUTPUT_ERRNOS`) that no writer named
itself, print one line on stderr and exit with status 1, never a traceback.
"""

from __future__ import annotations

from typing import Any

import click
import typer
from typer.core import TyperGroup

from crosssite.errors import CrossSiteError
from crosssite.ioutil import output_error


class GuardedGroup(TyperGroup):
    """The root command group: runs the chosen command and turns its named errors into one line and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CrossSiteError as error:
            raise fail(error) from None
        except OSError as error:
            mapped = output_error(error)
            if mapped is None:
                raise
            raise fail(mapped) from None


app = typer.Typer(
    cls=GuardedGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Cross-site COVID-19 CT classification (Wang, Liu, Dou, IEEE JBHI 2020).",
)


@app.callback()
def _root() -> None:
    """Cross-site COVID-19 CT classification (Wang, Liu, Dou, IEEE JBHI 2020)."""


def one_line(text: object) -> str:
    """``text`` with every run of white space (line breaks of multi-line library messages included) as one space."""
    return " ".join(str(text).split())


def fail(error: CrossSiteError | str) -> typer.Exit:
    """Print ``error`` as one line on stderr and return the exit (status 1) to raise: never a traceback."""
    typer.echo(f"error: {one_line(error)}", err=True)
    return typer.Exit(1)
