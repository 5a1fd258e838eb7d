"""``etf explain``: where a trained fuser looks, as PNGs.

For images, each fuser's attention maps (``Fuser.attention_maps``: the ensemble token's
attention, each Q-Face label query's cross-attention, each FRA region's heatmap) are cut
into the groups (one layer of one prior) they cover and drawn over the image as that
prior's encoder saw it, one panel per group with a patch grid. For a split of the cache,
each map's share of weight per group (prior / stage) is averaged over the split and drawn
as a bar chart, with the numbers beside it as JSON.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from etf.cache.catalog import CacheDir
from etf.cache.features import Batches, Group, default_memory_budget
from etf.data.base import Dataset, get_adapter, load_dataset
from etf.data.images import read_image, require_readable
from etf.errors import EtfError
from etf.pipeline.extract.run import resolve_device
from etf.pipeline.fit.fusers.layers import group_shares
from etf.pipeline.fit.predict import Predictor, load_model, load_predictor, prior_tokens, run_priors
from etf.utils import mark_owned


def group_label(g: Group, groups: list[Group]) -> str:
    """``A`` for a prior read at one layer, ``A L4`` when the run reads several of its layers."""
    several = sum(h.prior == g.prior for h in groups) > 1
    return f"{g.name} L{g.layer}" if several else g.name


def patch_maps(weights: torch.Tensor, groups: list[Group]) -> list[np.ndarray | None]:
    """One sample's (S,) weights to each group's (h, w) patch-grid map (None: no grid)."""
    out = []
    for g, w in zip(groups, weights.split([g.tokens for g in groups])):
        out.append(w[g.layout.prefix :].reshape(g.layout.grid).cpu().numpy() if g.layout.grid else None)
    return out


def _filename(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "map"


def _encoder_view(p: Predictor, prior: int, image: Path) -> np.ndarray:
    """The image as prior ``prior``'s encoder saw it (resized, cropped), as (H, W, 3) in [0, 1]."""
    enc = p.encoders[prior]
    x = enc.transform()(read_image(image))
    mean, std = (torch.tensor(enc.data_config[k]).view(3, 1, 1) for k in ("mean", "std"))
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def explain_images(
    run: Path, images: list[Path], out: Path, weights: dict[str, Path] | None = None, device: str = "auto"
) -> list[Path]:
    """One PNG per image: a row per attention map, a column per group with a patch grid; for
    a fuser whose maps cover pooled tokens only, each map's share per prior (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    require_readable(images)
    p = load_predictor(run, weights, device)
    spatial = [i for i, g in enumerate(p.groups) if g.layout.grid]
    with torch.no_grad():
        maps = p.model.fuser.eval().attention_maps(prior_tokens(p, images))
    mark_owned(out, "explain")
    if not spatial or not getattr(p.model.fuser, "maps_over_patches", True):
        return [_share_panels(p, images, maps, out, b) for b in range(len(images))]
    written = []
    for b, image in enumerate(images):
        views = {p.groups[i].prior: _encoder_view(p, p.groups[i].prior, image) for i in spatial}
        fig, axes = plt.subplots(
            len(maps),
            len(spatial),
            figsize=(2.9 * len(spatial) + 0.6, 2.7 * len(maps) + 0.5),
            squeeze=False,
            layout="constrained",
        )
        fig.suptitle(f"{Path(image).name}: where the {p.config['fuser']} fuser attends", fontsize=10)
        for row, (name, weights_) in enumerate(maps.items()):
            grids = patch_maps(weights_[b], p.groups)
            shares = group_shares(weights_[b : b + 1], p.groups)[0]
            top = max(float(grids[i].max()) for i in spatial) or 1.0  # one scale per map: panels compare
            for col, i in enumerate(spatial):
                ax, view = axes[row, col], views[p.groups[i].prior]
                ax.imshow(view)
                shown = ax.imshow(
                    grids[i],
                    cmap="inferno",
                    alpha=0.55,
                    vmin=0.0,
                    vmax=top,
                    interpolation="bilinear",
                    extent=(0, view.shape[1], view.shape[0], 0),
                )
                ax.set_title(f"{name} · {group_label(p.groups[i], p.groups)} ({shares[i]:.0%} of it)", fontsize=8)
                ax.axis("off")
            fig.colorbar(shown, ax=list(axes[row]), shrink=0.8, label="attention weight per token")
        path = out / f"{b}_{_filename(Path(image).stem)}_{_filename(p.config['fuser'])}.png"  # images may share a name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _share_panels(p: Predictor, images: list[Path], maps: dict[str, torch.Tensor], out: Path, b: int) -> Path:
    """Image ``b``'s share of each map per group, as bars: what a fuser that reads one pooled
    token per prior (or tokens without a patch grid) attends to has no map over the image."""
    import matplotlib.pyplot as plt

    labels = [group_label(g, p.groups) for g in p.groups]
    fig, axes = plt.subplots(1, len(maps), figsize=(1.5 + 1.4 * len(labels) * len(maps), 3.4), squeeze=False,
                             layout="constrained")  # fmt: skip
    why = "reads one pooled token per prior" if p.model.fuser.groups[0].layout.grid else "reads tokens without a grid"
    fig.suptitle(
        f"{Path(images[b]).name}: share of each map's attention per prior (the {p.config['fuser']} fuser {why}: "
        "no map over the image)",
        fontsize=9,
    )
    for ax, (name, weights_) in zip(axes[0], maps.items()):
        ax.bar(range(len(labels)), group_shares(weights_[b : b + 1], p.groups)[0].cpu().numpy())
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=8)
    path = out / f"{b}_{_filename(Path(images[b]).stem)}_{_filename(p.config['fuser'])}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_dataset(config: dict[str, Any], data_spec: str | None) -> Dataset:
    """The run's dataset: ``data_spec``, or rebuilt from what the run recorded; it must be
    the data the run was fitted on."""
    recorded = config["dataset"]
    if data_spec is None:
        adapter = get_adapter(recorded["name"])
        data_spec = recorded["name"] if adapter.embedded else f"{recorded['name']}:{recorded['root']}"
        dataset = load_dataset(data_spec, **recorded["options"])
    else:
        dataset = load_dataset(data_spec)
    if dataset.key != recorded["key"]:
        raise EtfError(
            f"--data {data_spec}: not the data the run was fitted on (dataset key {dataset.key}, the run's {recorded['key']}); pass --data SPEC"
        )
    return dataset


def split_shares(
    run: Path,
    split: str,
    data_spec: str | None = None,
    cache_dir: CacheDir | None = None,
    device: str = "auto",
    batch_size: int = 256,
) -> tuple[list[str], dict[str, list[float]], int]:
    """Group labels, each map's mean share per group over ``split``, and the sample count."""
    config, _, groups, model = load_model(run)
    dataset = run_dataset(config, data_spec)
    rows = np.nonzero(np.array(dataset.splits) == split)[0]
    if not len(rows):
        raise EtfError(
            f"--split {split}: {dataset.describe()} has no such split (splits: {', '.join(dict.fromkeys(dataset.splits))})"
        )
    dev = resolve_device(device)
    fuser = model.fuser.to(dev).eval()
    priors = run_priors(run, config, dataset, cache_dir)
    try:
        rows = rows[priors.valid[rows]]
        totals: dict[str, torch.Tensor] = {}
        for _, tokens in Batches(priors, rows, default_memory_budget(), batch_size, seed=0).iterate(rows, False):
            for name, w in fuser.attention_maps([t.to(dev).float() for t in tokens]).items():
                totals[name] = totals.get(name, 0) + group_shares(w, groups).sum(dim=0).cpu()
    finally:
        priors.close()
    means = {name: (t / len(rows)).tolist() for name, t in totals.items()}
    return [group_label(g, groups) for g in groups], means, len(rows)


def explain_split(
    run: Path,
    split: str,
    out: Path,
    data_spec: str | None = None,
    cache_dir: CacheDir | None = None,
    device: str = "auto",
) -> list[Path]:
    """A bar chart of each map's mean share per group over ``split``, and the numbers as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, means, n = split_shares(run, split, data_spec, cache_dir, device)
    mark_owned(out, "explain")
    x = np.arange(len(labels))
    width = 0.8 / len(means)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.6 * len(labels) * len(means) ** 0.5), 4.0))
    for k, (name, values) in enumerate(means.items()):
        ax.bar(x + (k - (len(means) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_xlabel("prior (and layer) read by the fuser")
    ax.set_ylabel("mean share of the map's attention")
    ax.set_title(f"{Path(run).name}: attention per prior, {split} split ({n} samples)")
    if len(means) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    stem = f"shares_{_filename(split)}"
    paths = [out / f"{stem}.png", out / f"{stem}.json"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    paths[1].write_text(json.dumps({"split": split, "samples": n, "groups": labels, "shares": means}, indent=1) + "\n")
    return paths
