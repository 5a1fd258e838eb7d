"""What a fit is configured by, importable without torch: the command line builds these
(and takes its option defaults from them) before any heavy library loads."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from etf.cache.location import Location
from etf.errors import EtfError

#: verify tasks' margin softmax kinds and their default margin m
MARGINS = {"arcface": 0.5, "cosface": 0.35}

#: choices of the ET-Fuser formulation's flags (see ``etf.pipeline.fit.fusers.etfuser``)
PRIOR_TOKENS = ("pooled", "all")
FUSE_MODES = ("add", "gate")
POSITION_CODES = ("sinusoidal", "single")
#: what task heads read: the canonical prior's patch grid (with t added) or its pooled token
HEADS = ("auto", "spatial", "pooled")
#: ``etf predict --infer`` and the two modes every fit evaluates its test splits in
INFER_MODES = ("all", "canonical")
#: ``etf fit --views``: train on a random view of each sample per epoch, or on the clean view only
VIEW_MODES = ("random", "clean")
#: landmark losses (``--loss``): Wing per coordinate, Wing on each sample's whole error vector's
#: Euclidean norm (the authors'), or L1
LANDMARK_LOSSES = ("wing", "wing-norm", "l1")
#: landmark target units (``--landmark-units``): standardised per coordinate, or the training
#: landmarks' extent mapped to [0, 1] (the authors' image units, see ``heads.Landmarks``)
LANDMARK_UNITS = ("standard", "extent")
#: ``--optimizer``: AdamW (decoupled weight decay) or Adam (L2 through the gradient, the authors')
OPTIMIZERS = ("adamw", "adam")
#: ``--select-by``: the epoch kept is the best by the first task's selection metric on val, by
#: the val loss, or by val macro F1 where the first task classifies and the val loss otherwise (the authors')
SELECT_BY = ("metric", "loss", "f1-or-loss")
#: ``--recipe``: the values a recipe gives the settings a command leaves unset (any option
#: given still wins). ``authors`` is the authors' training (configs/train_knowledge_token.py,
#: tools/trainer_base.py, models/heads/MLP.py, models/losses.py at c1b3cfd); README lists each
#: setting beside etf's. ``landmarks`` holds the options it gives landmark tasks.
RECIPES: dict[str, dict[str, Any]] = {
    "etf": {},
    "authors": {
        "optimizer": "adam",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "batch_size": 32,
        "warmup_epochs": 10.0,
        "schedule": "periodic:20",
        "epochs": 10000,
        "early_stop": 100,
        "select_by": "f1-or-loss",
        "position_code": "single",
        "canonical_norm": False,
        "readout": "authors",
        "landmarks": {"criterion": "wing-norm", "units": "extent"},
    },
}
#: ``--readout``: what each task head is: one Linear (etf), or the authors' heads (classifier:
#: ReLU, DropPath 0.2, BatchNorm1d, Linear; regressor: Dropout 0.2, Linear to 256, Linear)
READOUTS = ("linear", "authors")

#: the fusers that build on ET-Fuser's sequence and so read its formulation flags
ET_FUSERS = ("etfuser", "etfuser+qface")
#: what unset (None) FuserConfig fields mean, per formulation: ``paper`` is the authors'
#: configs/train_knowledge_token.py (depth 1, FFN width = token width, dropout 0.2),
#: ``token`` this project's token-level models (and every other fuser)
MODEL_DEFAULTS = {
    "paper": {"depth": 1, "mlp_ratio": 1.0, "dropout": 0.2},
    "token": {"depth": 2, "mlp_ratio": 2.0, "dropout": 0.0},
}
#: the FuserConfig fields every fuser reads: training-time dropping, the auxiliary objective
#: (refused where a fuser has none) and what spatial heads read
READ_BY_ALL = ("mask", "aux", "head", "readout")
_SEQUENCE = ("depth", "heads", "mlp_ratio", "dropout", "attn", "prior_tokens", "fuse", "pool", "canonical_norm")
#: the other FuserConfig fields each fuser reads (ET-Fuser's by formulation: ``pooled`` or
#: ``all`` prior tokens); a field a fuser does not read is None in its resolved config, so
#: that equal models have equal configs (an ablation grid runs a ``concat`` point once,
#: whatever ``attn`` lists). ``tests/test_fuser_settings.py`` checks each entry against the models.
FUSER_READS: dict[str, tuple[str, ...]] = {
    "linear": ("pool", "canonical_norm"),
    "mean": ("dim", "pool"),
    "concat": ("pool",),
    "etfuser:pooled": (*_SEQUENCE, "position_code"),
    "etfuser:all": (*_SEQUENCE, "dim", "recon_ratio"),
    "etfuser+qface:pooled": (*_SEQUENCE, "position_code", "queries"),
    "etfuser+qface:all": (*_SEQUENCE, "dim", "recon_ratio", "queries"),
    "qface": ("dim", "depth", "heads", "mlp_ratio", "dropout", "queries"),
    "fra": ("dim", "mlp_ratio", "dropout", "regions", "temperature"),
}
#: FuserConfig fields read only where a task of that kind is fitted
TASK_READS = {"head": "spatial", "queries": "multilabel"}


@dataclass
class FuserConfig:
    """Fuser hyper-parameters; each fuser reads the ones it uses (:data:`FUSER_READS`).

    Fields left ``None`` take the default of the model they configure (:func:`resolve`):
    ``etfuser`` is the authors' formulation unless told otherwise (``prior_tokens`` pooled,
    ``fuse`` add and :data:`MODEL_DEFAULTS` ``paper``), ``etfuser+qface`` the token-level
    one. After :func:`resolve`, the fields a fuser does not read are ``None``.
    """

    dim: int | None = 256
    depth: int | None = None
    heads: int | None = 4
    mlp_ratio: float | None = None
    dropout: float | None = None
    attn: str | None = "full"
    mask: str = "none"
    #: ET-Fuser's prior tokens: ``pooled`` (one per prior, zero-padded: the authors') or ``all``
    prior_tokens: str | None = None
    #: how t joins the canonical representation: ``add`` (the authors') or a zero-initialised ``gate``
    fuse: str | None = None
    #: the pooled sequence's fixed position code: ``sinusoidal`` (Vaswani) or the authors' ``single`` frequency
    position_code: str | None = None
    #: what heads of spatial tasks (landmarks) read: the canonical grid plus t (``spatial``), its
    #: pooled token (``pooled``), or ``auto``: spatial where the canonical tokens have a grid
    head: str | None = "auto"
    #: each prior's pooled token: None is its own pooling (recorded in its store's layout),
    #: else one of ``etf.cache.format.POOL_OVERRIDES`` where its tokens allow it
    pool: str | None = None
    #: whether the canonical representation is normalised before t is added (LayerNorm of the
    #: pooled token, GroupNorm of the map); the authors add t to the raw map
    canonical_norm: bool | None = True
    #: Q-Face label queries: ``label`` gives a multi-label task one query per label, ``task`` one per task
    queries: str | None = "label"
    #: FRA: number of facial-mask embeddings (regions) and the heatmap softmax temperature
    regions: int | None = 8
    temperature: float | None = 0.1
    #: auxiliary objective: ``none``, ``recon:W`` (ET-Fuser fusers) or ``sinkhorn:W`` (fra)
    aux: str = "none"
    #: fraction of the present prior tokens that ``recon`` hides
    recon_ratio: float | None = 0.5
    #: each task's head: one Linear, or the authors' (:data:`READOUTS`)
    readout: str = "linear"

    def __post_init__(self) -> None:
        from etf.cache.tokens import parse_pool

        for flag, value, choices in (
            ("--attn", self.attn, ("full", "intra")),
            ("--prior-tokens", self.prior_tokens, PRIOR_TOKENS),
            ("--fuse", self.fuse, FUSE_MODES),
            ("--position-code", self.position_code, POSITION_CODES),
            ("--head", self.head, HEADS),
            ("--queries", self.queries, ("label", "task")),
            ("--readout", self.readout, READOUTS),
        ):
            if value is not None and value not in choices:
                raise EtfError(f"{flag} {value!r}: use {' or '.join(choices)}")
        if self.pool is not None:
            parse_pool(self.pool)
        for flag, value in (("--dim", self.dim), ("--depth", self.depth), ("--heads", self.heads)):
            if value is not None and value < 1:
                raise EtfError(f"{flag} {value}: must be at least 1")
        if self.mlp_ratio is not None and self.mlp_ratio <= 0:
            raise EtfError(f"--mlp-ratio {self.mlp_ratio}: must be positive")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise EtfError(f"--dropout {self.dropout}: must be in [0, 1)")
        parse_mask(self.mask)
        parse_aux(self.aux)
        if self.dim is not None and self.heads is not None and self.dim % self.heads:
            raise EtfError(f"--dim {self.dim} is not divisible by --heads {self.heads}")
        if self.regions is not None and self.regions < 1:
            raise EtfError(f"--regions {self.regions}: need at least one region")
        if self.temperature is not None and self.temperature <= 0:
            raise EtfError(f"--temperature {self.temperature}: must be positive")
        if self.recon_ratio is not None and not 0 < self.recon_ratio < 1:
            raise EtfError(f"--recon-ratio {self.recon_ratio}: must be in (0, 1)")


def fuser_reads(fuser: str, cfg: FuserConfig) -> tuple[str, ...]:
    """The FuserConfig fields ``fuser`` reads under ``cfg`` (its formulation decides for ET-Fuser)."""
    if fuser in ET_FUSERS:
        tokens = cfg.prior_tokens or ("pooled" if fuser == "etfuser" else "all")
        fuser = f"{fuser}:{tokens}"
    return (*READ_BY_ALL, *FUSER_READS.get(fuser, ()))


def resolve(fuser: str, cfg: FuserConfig, task_kinds: list[str] | None = None) -> FuserConfig:
    """``cfg`` with its unset fields filled for ``fuser`` and the fields ``fuser`` does not read
    set to None, so that equal models have equal configs. With ``task_kinds`` (the fitted
    tasks' kinds), the settings no task reads (:data:`TASK_READS`) are cleared too."""
    reads = set(fuser_reads(fuser, cfg))
    if parse_aux(cfg.aux)[0] != "recon":
        reads.discard("recon_ratio")
    if task_kinds is not None:
        kinds = set(task_kinds)
        if "landmarks" in kinds:
            kinds.add("spatial")
        reads -= {k for k, kind in TASK_READS.items() if kind not in kinds}
    filled: dict[str, Any] = {}
    if fuser in ET_FUSERS:
        tokens = cfg.prior_tokens or ("pooled" if fuser == "etfuser" else "all")
        filled = {"prior_tokens": tokens, "fuse": cfg.fuse or ("add" if tokens == "pooled" else "gate")}
        if tokens == "pooled":
            filled["position_code"] = cfg.position_code or "sinusoidal"
        defaults = MODEL_DEFAULTS["paper" if tokens == "pooled" else "token"]
    else:
        defaults = MODEL_DEFAULTS["token"]
    filled |= {k: v for k, v in defaults.items() if getattr(cfg, k) is None}
    # a field read but unset (a config resolved for another formulation): the dataclass default
    filled |= {f.name: f.default for f in fields(cfg) if getattr(cfg, f.name) is None and f.name not in filled}
    return replace(
        cfg, **{f.name: filled.get(f.name, getattr(cfg, f.name)) if f.name in reads else None for f in fields(cfg)}
    )


def parse_mask(mask: str) -> tuple[str, float]:
    """``none``, ``token:P`` or ``prior:P`` (0 <= P < 1)."""
    if mask == "none":
        return "none", 0.0
    m = re.fullmatch(r"(token|prior):([0-9.]+)", mask)
    if not m or not 0.0 <= float(m.group(2)) < 1.0:
        raise EtfError(f"--mask {mask!r}: use none, token:P or prior:P with 0 <= P < 1")
    return m.group(1), float(m.group(2))


def parse_aux(aux: str) -> tuple[str, float]:
    """``none``, ``recon:W`` or ``sinkhorn:W`` (W > 0, the loss weight)."""
    if aux == "none":
        return "none", 0.0
    m = re.fullmatch(r"(recon|sinkhorn):([0-9.eE+-]+)", aux)
    try:
        weight = float(m.group(2)) if m else -1.0
    except ValueError:
        weight = -1.0
    if weight <= 0:
        raise EtfError(f"--aux {aux!r}: use none, recon:W or sinkhorn:W with a weight W > 0")
    return m.group(1), weight


@dataclass
class FitConfig:
    """Everything ``etf fit`` takes besides the dataset. Recorded in the run's config.json."""

    cache_dir: Path | Location  # or a URL: see etf.cache.location
    encoders: list[str]
    out: Path
    tasks: list[str] = field(default_factory=list)
    fuser: str = "etfuser"
    fuser_config: FuserConfig = field(default_factory=FuserConfig)
    layers: str = "last"
    tokens: str | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    train_fraction: float = 1.0
    shots: int | None = None
    val_fraction: float = 0.1
    test_split: str | None = None
    max_memory: int | None = None
    device: str = "auto"
    #: autocast precision of training: auto (bf16 on a GPU that has it, else fp32), fp32, bf16, fp16
    precision: str = "auto"
    progress: bool | None = None
    #: ``random`` or ``clean``; None: random where the stores hold augmented views
    views: str | None = None
    feature_aug: str = "none"
    optimizer: str = "adamw"
    #: ``cosine``: warm-up, then one cosine to zero; ``periodic:P``: warm-up, then a cosine
    #: back and forth every P epochs (the authors' warm restarts)
    schedule: str = "cosine"
    #: stop after this many epochs without a better selection score (None: run every epoch)
    early_stop: int | None = None
    select_by: str = "metric"
    #: the recipe the unset settings came from (:data:`RECIPES`), recorded
    recipe: str = "etf"

    def __post_init__(self) -> None:
        from etf.pipeline.fit.feature_aug import parse_feature_aug

        self.fuser_config = resolve(self.fuser, self.fuser_config)  # config.json records what was built
        if self.views is not None and self.views not in VIEW_MODES:
            raise EtfError(f"--views {self.views!r}: use {' or '.join(VIEW_MODES)}")
        parse_feature_aug(self.feature_aug)
        for flag, value, choices in (
            ("--optimizer", self.optimizer, OPTIMIZERS),
            ("--select-by", self.select_by, SELECT_BY),
            ("--recipe", self.recipe, tuple(RECIPES)),
        ):
            if value not in choices:
                raise EtfError(f"{flag} {value!r}: use {' or '.join(choices)}")
        schedule_period(self.schedule)
        for flag, value, ok, want in (
            ("--epochs", self.epochs, self.epochs >= 1, "at least 1"),
            ("--batch-size", self.batch_size, self.batch_size >= 1, "at least 1"),
            ("--lr", self.lr, self.lr > 0, "positive"),
            ("--weight-decay", self.weight_decay, self.weight_decay >= 0, "at least 0"),
            ("--warmup-epochs", self.warmup_epochs, self.warmup_epochs >= 0, "at least 0"),
            ("--train-fraction", self.train_fraction, 0 < self.train_fraction <= 1, "in (0, 1]"),
            ("--val-fraction", self.val_fraction, 0 < self.val_fraction < 1, "in (0, 1)"),
            ("--shots", self.shots, self.shots is None or self.shots >= 1, "at least 1"),
            ("--early-stop", self.early_stop, self.early_stop is None or self.early_stop >= 1, "at least 1 epoch"),
            ("--max-memory", self.max_memory, self.max_memory is None or self.max_memory > 0, "a positive size"),
        ):  # the command line's ranges, for settings from a TOML file or the API too
            if not ok:
                raise EtfError(f"{flag} {value}: must be {want}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cache_dir"], d["out"] = str(self.cache_dir), str(self.out)
        return d


def schedule_period(schedule: str) -> float | None:
    """``--schedule``: None for ``cosine``, the period in epochs for ``periodic:P``."""
    if schedule == "cosine":
        return None
    m = re.fullmatch(r"periodic:([0-9.]+)", schedule)
    if not m or not float(m.group(1)) > 0:
        raise EtfError(f"--schedule {schedule!r}: use cosine, or periodic:P with a period of P > 0 epochs")
    return float(m.group(1))


def apply_recipe(recipe: str, settings: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """``settings`` (option names to values) with the recipe's values for those not ``given``;
    its landmark task options are the tasks' (``heads.with_recipe``), not settings."""
    if recipe not in RECIPES:
        raise EtfError(f"--recipe {recipe!r}: use {' or '.join(RECIPES)}")
    chosen = {k: v for k, v in RECIPES[recipe].items() if k not in given and k != "landmarks"}
    return {**settings, **chosen, "recipe": recipe}


#: FitConfig fields that shape only a model and its optimisation. Configs that differ in
#: nothing else read the same batches in the same order, so :func:`fit_many` trains them
#: together over one read of the data.
MODEL_FIELDS = (
    "fuser", "fuser_config", "lr", "weight_decay", "warmup_epochs", "feature_aug", "optimizer", "schedule", "early_stop",
    "out", "progress",
)  # fmt: skip


def data_key(cfg: FitConfig) -> dict[str, Any]:
    """What a config's data and batch sequence depend on: configs with equal keys can share a pass."""
    return {k: v for k, v in cfg.to_json().items() if k not in MODEL_FIELDS}
