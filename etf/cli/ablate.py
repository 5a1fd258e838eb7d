"""``etf ablate``: encoder-combination grids from the cache, with statistics and a report."""

from __future__ import annotations

from pathlib import Path

import click

from etf.cli.fit import fuser_options, given_options, joint_options, training_options
from etf.cli.options import cache_option, data_options, encoders_option
from etf.pipeline.ablate import BACKENDS, CORRECTIONS, SUBSETS
from etf.pipeline.fit.config import INFER_MODES, apply_recipe

#: click parameter names that differ from the grid's setting names
_SETTING = {"cache_dir": "cache", "data_spec": "data"}


@click.command("ablate")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML experiment file (keys as these options); options given here override it.",
)
@cache_option
@data_options(multiple=True)
@encoders_option("Priors, in order: the first encoder of a subset is its canonical prior.", required=False)
@click.option(
    "--task",
    "tasks",
    multiple=True,
    help="As for etf fit (K=SPEC or NAME=SPEC with several --data); repeat for multi-task.  [default: the dataset's]",
)
@joint_options
@click.option("--subsets", default="all", show_default=True, help=SUBSETS.replace(" or ", ", ") + ".")
@click.option(
    "--fusers",
    default="etfuser",
    show_default=True,
    help="Comma list. linear (the canonical prior alone) is every subset's baseline and always runs.",
)
@fuser_options
@training_options
@click.option("--seeds", default="0", show_default=True, help="Comma list of seeds.")
@click.option(
    "--correction",
    type=click.Choice(CORRECTIONS),
    default="holm",
    show_default=True,
    help="Multiple-comparison correction over every comparison of the report (fdr_bh: Benjamini-Hochberg).",
)
@click.option(
    "--metric-infer",
    type=click.Choice(INFER_MODES),
    default="all",
    show_default=True,
    help="The report's metric with every prior, or with the canonical prior alone (both are in every run; the report compares them).",
)
@click.option(
    "--probe",
    is_flag=True,
    help="First probe every prior alone (etf probe: kNN, logreg, CKA) into OUT/probe; the report adds their "
    "table, the CKA map and each fused subset's gain beside its priors' solo scores.",
)
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1), help="Parallel fits (groups).")
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="loky",
    show_default=True,
    help="joblib backend: local processes, or a Dask/Ray cluster (optional extras).",
)
@click.option(
    "--scheduler", help="Dask scheduler (tcp://HOST:8786) or Ray address.  [default: a local cluster of --jobs workers]"
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Grid directory: runs/ and the report; new, empty, or a grid etf wrote (optional with --dry-run).",
)
@click.option("--dry-run", is_flag=True, help="List the runs, grouped as they would train, and fit nothing.")
@click.pass_context
def command(ctx: click.Context, config_file: Path | None, dry_run: bool, **options) -> None:
    """Fit every encoder subset x fuser x setting x seed from the cache (parallel, resumable) and report."""
    from etf.pipeline.ablate.grid import Grid, load_toml, plan_grid, run_grid, status

    given = given_options(ctx) & options.keys()
    settings = {_SETTING.get(k, k): v for k, v in options.items() if k not in given and v not in (None, [])}
    toml = load_toml(config_file) if config_file is not None else {}
    settings.update(toml)
    settings.update({_SETTING.get(k, k): options[k] for k in given})
    recipe = settings.pop("recipe", "etf")
    settings = apply_recipe(recipe, settings, {_SETTING.get(k, k) for k in given} | set(toml))
    plan = plan_grid(Grid.from_settings(settings, where=str(config_file) if config_file else None, dry_run=dry_run))
    if dry_run:
        for k, group in enumerate(plan.groups(), 1):
            first = group[0].labels
            click.echo(f"group {k}: {first['subset']} seed {first['seed']}")
            for p in group:
                settings = " ".join(f"{k}={v}" for k, v in p.labels.items() if k not in ("subset", "priors", "seed"))
                click.echo(f"  {p.run_id}  {status(p) if plan.grid.out else '-':<8} {settings}")
        return
    outcome = run_grid(plan, click.echo)
    click.echo(f"report: {outcome.report} (with results.csv, results.json and plots)")
    if outcome.stopped:
        click.echo(
            f"the grid stopped: {outcome.stopped}; finished runs are kept, run the same command to resume", err=True
        )
        ctx.exit(1)
    if outcome.failed:
        click.echo(
            f"{len(outcome.failed)} run(s) failed (errors in the report); run the same command again to retry them",
            err=True,
        )
        ctx.exit(1)


def _as_grid_options(cmd: click.Command) -> None:
    """The shared fit options as a grid takes them: --data may come from --config, and
    --attn, --mask, --views and the formulation flags take comma lists (each value a grid axis)."""
    for param in cmd.params:
        if param.name == "data_spec":
            param.required = False
        elif param.name in ("attn", "mask", "prior_tokens", "fuse", "position_code", "head", "pool", "views", "mix"):
            param.type = click.STRING
            param.help = f"{param.help or ''} Comma list: a grid axis.".strip()
        elif param.name == "progress":
            param.help = "Each fit's progress bar (for --jobs 1).  [default: off]"


_as_grid_options(command)
