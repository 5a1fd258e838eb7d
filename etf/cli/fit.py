"""``etf fit``: a fuser and task heads from the cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from etf.cache.format import POOL_OVERRIDES
from etf.cli.options import (
    cache_option,
    data_options,
    default,
    device_option,
    encoders_option,
    open_dataset,
    progress_option,
)
from etf.pipeline.extract import PRECISIONS
from etf.pipeline.fit.config import (
    FUSE_MODES,
    HEADS,
    LANDMARK_LOSSES,
    LANDMARK_UNITS,
    MARGINS,
    OPTIMIZERS,
    POSITION_CODES,
    PRIOR_TOKENS,
    READOUTS,
    RECIPES,
    SELECT_BY,
    VIEW_MODES,
    FitConfig,
    FuserConfig,
    apply_recipe,
)
from etf.pipeline.fit.fusers import fuser_names
from etf.utils import parse_size

POSITIVE = click.IntRange(min=1)
FRACTION = click.FloatRange(0, 1, min_open=True, max_open=True)


def _fuser(name: str, **kw: Any) -> Callable:
    return click.option(f"--{name.replace('_', '-')}", default=default(FuserConfig, name), show_default=True, **kw)


def _fit(name: str, **kw: Any) -> Callable:
    return click.option(f"--{name.replace('_', '-')}", default=default(FitConfig, name), show_default=True, **kw)


def fuser_options(fn):
    """Fuser hyper-parameters, shared with ``etf ablate``."""
    for opt in reversed(
        [
            _fuser("dim", type=POSITIVE, help="Fuser width d (the pooled etfuser runs at the token width)."),
            _fuser(
                "depth",
                type=POSITIVE,
                help="Self-attention blocks.  [default: 1 for the pooled etfuser (the authors'), else 2]",
            ),
            _fuser("heads", type=POSITIVE, help="Attention heads."),
            _fuser(
                "mlp_ratio",
                type=click.FloatRange(0, min_open=True),
                help="MLP width over d.  [default: 1 for the pooled etfuser (FFN width = token width), else 2]",
            ),
            _fuser(
                "dropout",
                type=click.FloatRange(0, 1, max_open=True),
                help="[default: 0.2 for the pooled etfuser (also on its attention weights), else 0]",
            ),
            _fuser(
                "attn",
                type=click.Choice(["full", "intra"]),
                help="intra: prior tokens attend only within their prior; the ensemble token sees all.",
            ),
            _fuser("mask", help="Training-time dropping: none, token:P, prior:P."),
            _fuser(
                "prior_tokens",
                type=click.Choice(PRIOR_TOKENS),
                help="etfuser: one pooled token per prior (the authors') or every token (token-level).  "
                "[default: pooled for etfuser, all for etfuser+qface]",
            ),
            _fuser(
                "fuse",
                type=click.Choice(FUSE_MODES),
                help="etfuser: t added to the canonical representation (the authors') or through a zero-initialised gate.  "
                "[default: add with pooled tokens, gate with all]",
            ),
            _fuser(
                "position_code",
                type=click.Choice(POSITION_CODES),
                help="Pooled tokens' fixed position code: sinusoidal (Vaswani) or single (the authors' one frequency).  "
                "[default: sinusoidal]",
            ),
            _fuser(
                "head",
                type=click.Choice(HEADS),
                help="What landmark heads read: spatial, the canonical grid plus t (a conv head); pooled, its pooled "
                "token plus t; auto: spatial where the canonical tokens have a grid. Other tasks read the pooled token.",
            ),
            _fuser(
                "pool",
                type=click.Choice(POOL_OVERRIDES),
                help="Each prior's pooled token: token (its class token), avg, max, avgmax (of its patch tokens) or "
                "token+avg (both, concatenated: dinov2's linear evaluation); a prior without a class token pools its "
                "patches.  [default: each prior's own pooling, recorded in its store]",
            ),
            click.option(
                "--canonical-norm/--no-canonical-norm",
                default=default(FuserConfig, "canonical_norm"),
                show_default=True,
                help="Normalise the canonical prior's pooled token (LayerNorm) and map (GroupNorm) before t is "
                "added; the authors add t to the raw map.",
            ),
            _fuser(
                "queries",
                type=click.Choice(["label", "task"]),
                help="qface: one label query per label of a multilabel task, or one per task.",
            ),
            _fuser("regions", type=POSITIVE, help="fra: facial-mask embeddings (regions)."),
            _fuser("temperature", type=click.FloatRange(0, min_open=True), help="fra: heatmap softmax temperature."),
            _fuser(
                "aux",
                help="Auxiliary loss: recon:W (etfuser, etfuser+qface: reconstruct hidden prior tokens) or sinkhorn:W (fra: balanced regions).",
            ),
            _fuser("recon_ratio", type=FRACTION, help="recon: fraction of prior tokens hidden."),
            _fuser(
                "readout",
                type=click.Choice(READOUTS),
                help="Each task's head: one Linear, or the authors' (classifier: ReLU, DropPath 0.2, BatchNorm1d, "
                "Linear; regressor: Dropout 0.2, Linear to 256, Linear).",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def _feature_aug(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from etf.pipeline.fit.feature_aug import parse_feature_aug

    parse_feature_aug(value)
    return value


def training_options(fn):
    """Optimisation and protocol options, shared with ``etf ablate``."""
    for opt in reversed(
        [
            _fit("layers", help="Store layers to use: last, all, or e.g. 4,8,12."),
            click.option(
                "--tokens", default=None, help="Read-time selection: cls, patch, pool:G or all.  [default: as stored]"
            ),
            _fit("epochs", type=POSITIVE),
            _fit("batch_size", type=POSITIVE),
            _fit("lr", type=click.FloatRange(0, min_open=True), help="Peak learning rate (AdamW)."),
            _fit("weight_decay", type=click.FloatRange(0)),
            _fit(
                "optimizer", type=click.Choice(OPTIMIZERS), help="AdamW, or Adam (its decay an L2 term: the authors')."
            ),
            _fit("warmup_epochs", type=click.FloatRange(0)),
            _fit(
                "schedule",
                help="After the warm-up: cosine (one half-period to zero) or periodic:P (a cosine down and back up "
                "every P epochs: the authors' warm restarts).",
            ),
            click.option(
                "--early-stop",
                type=POSITIVE,
                default=None,
                help="Stop after this many epochs without a better selection score.  [default: run every epoch]",
            ),
            _fit(
                "select_by",
                type=click.Choice(SELECT_BY),
                help="The epoch kept: best val selection metric, val loss, or f1-or-loss (val macro F1 where the first "
                "task classifies, else val loss: the authors').",
            ),
            _fit(
                "recipe",
                type=click.Choice(list(RECIPES)),
                help="Defaults for the options not given: etf's, or the authors' training (README lists each).",
            ),
            _fit(
                "train_fraction",
                type=click.FloatRange(0, 1, min_open=True),
                help="Seeded (stratified) fraction of train.",
            ),
            click.option("--shots", type=POSITIVE, help="K training samples per class of the first classify task."),
            _fit(
                "val_fraction",
                type=FRACTION,
                help="Seeded hold-out of train (by subject, identity or source image where the dataset has them) "
                "when there is no val split.",
            ),
            click.option(
                "--test-split",
                default=None,
                help="For a dataset without a test split: holdout:F[:SEED] (a seeded hold-out of train, by group, "
                "reported as test_holdout), val (its val split, reported as test_val) or none (fit only: no test).  "
                "[default: the dataset's test splits]",
            ),
            click.option(
                "--max-memory",
                default=None,
                callback=lambda ctx, param, v: parse_size(v) if v else None,
                help="Load tokens into memory up to this size (e.g. 8G), else stream.  [default: 40% of RAM, at most 16G]",
            ),
            click.option(
                "--views",
                type=click.Choice(VIEW_MODES),
                default=None,
                help="random: each epoch, each training sample in one of its stored views (seeded); clean: view 0 "
                "only. Evaluation reads view 0.  [default: random where the stores hold views (etf extract --views)]",
            ),
            _fit(
                "feature_aug",
                callback=_feature_aug,
                help="Feature-space augmentation of training tokens: none, or drop:P,scale:S,noise:S "
                "(token dropout, per-channel scaling, Gaussian noise).",
            ),
            device_option,
            _fit(
                "precision",
                type=click.Choice(PRECISIONS),
                help="Autocast precision of training (the loss stays fp32; fp16 scales it). "
                "auto: bf16 on a GPU that has it, else fp32.",
            ),
            progress_option,
        ]
    ):
        fn = opt(fn)
    return fn


def given_options(ctx: click.Context) -> set[str]:
    """The options the command line (or the environment) gave: the rest a recipe may set."""
    return {
        k
        for k in ctx.params
        if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }


def pop_fuser_config(kw: dict[str, Any]) -> FuserConfig:
    """Take the ``fuser_options`` values out of a command's keyword arguments."""
    names = {f.name for f in fields(FuserConfig)}
    return FuserConfig(**{k: kw.pop(k) for k in list(kw) if k in names})


def verify_options(fn):
    """Options of verify and landmarks tasks, shared with ``etf ablate``; a task string's own ``?key=`` wins."""
    for opt in reversed(
        [
            click.option(
                "--loss",
                type=click.Choice(LANDMARK_LOSSES),
                help="landmarks: Wing per coordinate, Wing on each sample's error norm (wing-norm: the authors'), "
                "or L1.  [default: wing]",
            ),
            click.option(
                "--wing-omega", type=click.FloatRange(0, min_open=True), help="landmarks: Wing's omega.  [default: 0.1]"
            ),
            click.option(
                "--landmark-units",
                type=click.Choice(LANDMARK_UNITS),
                help="landmarks: targets standardised per coordinate, or the training landmarks' extent as [0, 1] "
                "(the authors' image units).  [default: standard]",
            ),
            click.option(
                "--wing-epsilon",
                type=click.FloatRange(0, min_open=True),
                help="landmarks: Wing's epsilon.  [default: 2]",
            ),
            click.option("--embed-dim", type=POSITIVE, help="verify: embedding size.  [default: 512]"),
            click.option(
                "--margin", type=click.Choice(sorted(MARGINS)), help="verify: margin softmax.  [default: arcface]"
            ),
            click.option(
                "--margin-scale", type=click.FloatRange(0, min_open=True), help="verify: logit scale s.  [default: 64]"
            ),
            click.option(
                "--margin-m",
                type=click.FloatRange(0),
                help="verify: margin m.  [default: 0.5 arcface, 0.35 cosface]",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def pop_task_specs(kw: dict[str, Any], default: list[str]) -> list[str]:
    """``--task`` values (or the dataset's defaults) with the ``verify_options`` filled in,
    then what ``--recipe`` gives the task options still unset."""
    from etf.pipeline.fit.heads import with_recipe, with_task_options
    from etf.pipeline.fit.verification import with_options

    tasks = list(kw.pop("tasks")) or default
    tasks = with_task_options(
        tasks,
        "landmarks",
        "--loss, --wing-omega, --wing-epsilon and --landmark-units",
        criterion=kw.pop("loss"),
        omega=kw.pop("wing_omega"),
        epsilon=kw.pop("wing_epsilon"),
        units=kw.pop("landmark_units"),
    )
    tasks = with_recipe(tasks, kw["recipe"])
    return with_options(
        tasks, dim=kw.pop("embed_dim"), margin=kw.pop("margin"), s=kw.pop("margin_scale"), m=kw.pop("margin_m")
    )


def joint_options(fn):
    """Options of joint fits over several --data, shared with ``etf ablate``."""
    for opt in reversed(
        [
            click.option(
                "--mix",
                default=None,
                help="Joint fits: how steps draw on the datasets: balanced, proportional (to train sizes) or "
                "temperature:T (p ~ n^(1/T)).  [default: proportional]",
            ),
            click.option(
                "--task-weight",
                "task_weights",
                multiple=True,
                metavar="NAME=W",
                help="Joint fits: a task's loss weight (default 1); repeat for several tasks.",
            ),
            click.option(
                "--uncertainty",
                is_flag=True,
                default=None,
                help="Joint fits: weigh each task's loss by a learned log-variance (Kendall et al.).",
            ),
            click.option(
                "--steps-per-epoch",
                type=POSITIVE,
                default=None,
                help="Joint fits: training steps per epoch.  [default: one pass over the largest train split]",
            ),
            click.option(
                "--select",
                default=None,
                metavar="TASK",
                help="Joint fits: pick the epoch by this task's protocol metric.  "
                "[default: the mean relative change over all tasks]",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


#: the ``joint_options`` and their flags
JOINT_FLAGS = {
    "mix": "--mix",
    "task_weights": "--task-weight",
    "uncertainty": "--uncertainty",
    "steps_per_epoch": "--steps-per-epoch",
    "select": "--select",
}


def pop_joint_config(kw: dict[str, Any], datasets: int) -> Any:
    """The ``joint_options`` values as a JointConfig (None for one dataset, which takes none)."""
    from etf.errors import EtfError
    from etf.pipeline.fit.mixing import JointConfig, parse_task_weights

    values = {k: kw.pop(k) for k in JOINT_FLAGS}
    given = [JOINT_FLAGS[k] for k, v in values.items() if v not in (None, ())]
    if datasets == 1:
        if given:
            raise EtfError(f"{', '.join(given)}: for a joint fit over several --data; this fit has one")
        return None
    values["task_weights"] = parse_task_weights(list(values["task_weights"]))
    return JointConfig(**{k: v for k, v in values.items() if v not in (None, {})})


def joint_task_specs(kw: dict[str, Any], datasets: list[Any]) -> list[str]:
    """Every dataset's task strings as ``K=SPEC`` (its ``--task K=...`` values, else its
    defaults), with the ``verify_options`` filled in as for a single fit."""
    from etf.pipeline.fit.mixing import assign, dataset_labels

    per = assign(list(kw["tasks"]), dataset_labels([d.name for d in datasets]), "--task")
    per = [mine or list(d.tasks) for mine, d in zip(per, datasets)]
    kw["tasks"] = [s for mine in per for s in mine]
    flat = pop_task_specs(kw, [])
    out, at = [], 0
    for k, mine in enumerate(per):
        out += [f"{k + 1}={s}" for s in flat[at : at + len(mine)]]
        at += len(mine)
    return out


@click.command("fit")
@cache_option
@data_options(multiple=True)
@encoders_option("Priors (store names, NAME-HASHPREFIX, or store paths); the first is canonical.")
@click.option(
    "--task",
    "tasks",
    multiple=True,
    help="classify:COL, multilabel:C1,C2, regress:COL, landmarks:PREFIX, verify:COL; repeat for multi-task.  [default: the dataset's]",
)
@verify_options
@joint_options
@_fit("fuser", type=click.Choice(fuser_names()))
@fuser_options
@training_options
@_fit("seed", type=click.IntRange(min=0))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory (must be new or empty).")
@click.option("--overwrite", is_flag=True, help="Replace the run at --out (only a run etf wrote, nothing else).")
@click.pass_context
def command(ctx: click.Context, **kw: Any) -> None:
    """Train --fuser and task heads on cached tokens of --encoders; write the run to --out.

    With several --data, one fuser and every dataset's task heads train jointly."""
    from etf.pipeline.extract.run import resolve_device
    from etf.pipeline.fit.train import check_out, fit

    kw = apply_recipe(kw.pop("recipe"), kw, given_options(ctx))
    resolve_device(kw["device"])
    fuser_config = pop_fuser_config(kw)
    overwrite = kw.pop("overwrite")
    specs, crop = kw.pop("data_spec"), kw.pop("crop")
    joint = pop_joint_config(kw, len(specs))
    check_out(kw["out"], overwrite)
    datasets = [open_dataset(s, crop) for s in specs]
    if joint is None:
        from etf.pipeline.fit.mixing import assign, dataset_labels

        kw["tasks"] = assign(list(kw["tasks"]), dataset_labels([datasets[0].name]), "--task")[0]
        tasks = pop_task_specs(kw, datasets[0].tasks)
        click.echo(fit(datasets[0], FitConfig(tasks=tasks, fuser_config=fuser_config, **kw), overwrite).summary)
        return
    from etf.pipeline.fit.joint import fit_joint

    tasks = joint_task_specs(kw, datasets)
    cfg = FitConfig(tasks=tasks, fuser_config=fuser_config, **kw)
    click.echo(fit_joint(datasets, [cfg], joint, overwrite)[0].checked().summary)
