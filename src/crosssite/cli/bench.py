"""``crosssite bench``: the speed benchmark of the paper's network (see `crosssite.bench`)."""

from __future__ import annotations

import typer

from crosssite.cli.app import app


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Training step, evaluation batch and single-image latency against matmul peaks and the plain path.

    Options are those of benchmarks/bench_model.py: --json, --steps N, --width W, --image-size S,
    --per-site N, --threads N, --compile. With --preset cpu|paper (and --device cuda, --data DIR): the preset's
    training step as the engine runs it on the real sites, plain, each lever alone, and the fast path.
    """
    if "--preset" in ctx.args or any(a.startswith("--preset=") for a in ctx.args):
        from crosssite.bench_preset import main
    else:
        from crosssite.bench import main
    main(list(ctx.args))
