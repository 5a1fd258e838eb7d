"""Augmented views in the store: what extraction records is what a direct forward of the
recorded augmentation gives, the labels training uses land where the image content went,
and a killed views extraction resumes to the same arrays."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from etf.cache.audit import verify_store
from etf.cache.features import Batches, PriorSet, draw_views
from etf.cache.importer import import_tokens
from etf.cache.store import TokenStore
from etf.cli import main
from etf.data import load_dataset
from etf.data.geometry import MIRROR_5, is_mirror
from etf.errors import EtfError
from etf.pipeline.extract.augment import Augmenter, parse_augment
from etf.pipeline.extract.run import ExtractOptions, extract, store_spec
from etf.pipeline.fit.config import FitConfig
from etf.pipeline.fit.heads import parse_task
from etf.pipeline.fit.train import fit, view_targets
from etf.utils import spec_hash
from tests.conftest import IMG, TINY_VIT, etf_command, kill_after_chunks, make_image

H, W = 48, 40
#: five points (eyes, nose, mouth corners) and a colour for each, far apart in RGB
POINTS = np.array([[13.0, 17.0], [27.0, 17.0], [20.0, 25.0], [14.0, 33.0], [26.0, 33.0]])
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]])
#: on the CPU: the cached views are compared with direct fp32 forwards of the caller's model, and
#: store keys with fp32's (a GPU's auto precision, bf16, is another key)
OPTS = dict(workers=0, progress=False, chunk_rows=4, batch_size=4, device="cpu")


def dots(points: np.ndarray) -> Image.Image:
    yy, xx = np.mgrid[0:H, 0:W]
    a = np.zeros((H, W, 3), np.uint8)
    for (x, y), c in zip(points, COLOURS):
        a[(xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= 2.5**2] = c
    return Image.fromarray(a)


def found(img: Image.Image, colour: np.ndarray) -> np.ndarray | None:
    """Centre of the pixels of ``colour`` (None when the dot left the view)."""
    a = np.asarray(img).astype(float)
    near = np.abs(a - colour).max(axis=2) < 70
    if near.sum() < 3:
        return None
    yy, xx = np.nonzero(near)
    return np.array([xx.mean() + 0.5, yy.mean() + 0.5])


def write_csv(root: Path, n: int, columns: dict[str, list[float]], image) -> str:
    (root / "img").mkdir(parents=True)
    lines = ["path,split," + ",".join(columns)]
    for i in range(n):
        image(i).save(root / "img" / f"{i}.png")
        split = ("train", "train", "train", "val", "test")[i % 5]
        lines.append(f"img/{i}.png,{split}," + ",".join(f"{v[i]:.4f}" for v in columns.values()))
    (root / "d.csv").write_text("\n".join(lines) + "\n")
    return f"csv:{root / 'd.csv'}"


@pytest.fixture(scope="module")
def encoder():
    from etf.pipeline.extract.encoders import create_encoder

    return create_encoder(TINY_VIT, pretrained=False, img_size=IMG)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """10 images of five coloured dots, jittered per image; landmark labels where the dots are."""
    root = tmp_path_factory.mktemp("dots")
    rng = np.random.default_rng(0)
    pts = [POINTS + rng.uniform(-2, 2, POINTS.shape) for _ in range(10)]
    columns = {f"lm{k}_{a}": [p[k, j] for p in pts] for k in range(5) for j, a in enumerate("xy")}
    spec = write_csv(root, 10, columns, lambda i: dots(pts[i]))
    return dataclasses.replace(load_dataset(spec), mirrors={"lm": MIRROR_5}), root


@pytest.mark.parametrize("augment", ["flip", "flip:0.5,crop:0.8,rotate:15,shift:0.08,scale:0.1"])
def test_targets_from_the_stored_geometry_land_on_the_dots_of_the_view(faces, encoder, augment):
    """Training's targets for view v (mapped, and relabelled by the mirror map under a flip)
    lie on the dot that image content moved to: target i (say the image-left eye) on the
    dot that was point MIRROR_5[i] before a mirror."""
    dataset, root = faces
    res = extract(dataset, encoder, root / augment, ExtractOptions(views=4, augment=augment, view_seed=5, **OPTS))
    with TokenStore.open(res.path) as store:
        geometry = store.geometry()
        flips = store._rows("view_flip", 0, store.n)
    assert np.array_equal(flips, np.linalg.det(geometry[:, :, :2, :2]) < 0)
    task = parse_task("landmarks:lm", dataset)
    y, m = view_targets(dataset, [task], {task.name: task.targets(dataset)}, geometry)[task.name]
    aug = Augmenter(parse_augment(augment), seed=5)
    checked, mirrored = 0, 0
    for i in range(len(dataset)):
        img = dataset.load_image(i)
        for v in range(1, 4):
            view, matrix = aug.view(img, dataset.ids[i], v)
            np.testing.assert_allclose(matrix, geometry[i, v], atol=1e-9)
            mirrored += is_mirror(matrix)
            for k in range(5):
                at = found(view, COLOURS[MIRROR_5[k] if is_mirror(matrix) else k])
                if at is not None:
                    checked += 1
                    assert np.hypot(*(at - y[v, i, 2 * k : 2 * k + 2])) < 1.5, (i, v, k)
    assert checked > 100 and mirrored > 0
    if augment == "flip":
        assert mirrored == 30, "flip alone: every view is the mirror image"
    np.testing.assert_array_equal(y[0], task.targets(dataset)[0])


def test_a_cached_view_is_a_direct_forward_of_its_recorded_augmentation(faces, encoder, tmp_path):
    dataset, _ = faces
    opts = ExtractOptions(views=3, augment="face", dtype="float32", **OPTS)
    res = extract(dataset, encoder, tmp_path, opts)
    aug, tf = Augmenter(parse_augment("face"), seed=0), encoder.transform()
    with TokenStore.open(res.path) as store:
        assert store.views == 3 and store.spec["views"] == {
            "count": 3,
            "augment": str(parse_augment("face")),
            "seed": 0,
        }
        for i in (0, 7):
            img = dataset.load_image(i)
            for v in range(3):
                image = img if v == 0 else aug.view(img, dataset.ids[i], v)[0]
                with torch.inference_mode():
                    direct = encoder.model.forward_features(tf(image)[None])[0].numpy()
                stored = store.read_layers([12], i, i + 1, view=v)[12][0]
                np.testing.assert_allclose(stored, direct, atol=2e-5, rtol=1e-4)
        assert not np.allclose(store.read_layers([12], 0, 4, 1)[12], store.read_layers([12], 0, 4, 2)[12])
    assert verify_store(res.path) == []
    plain_opts = dataclasses.replace(opts, views=1, augment=None)
    plain = extract(dataset, encoder, tmp_path, plain_opts)
    with TokenStore.open(plain.path) as a, TokenStore.open(res.path) as b:
        np.testing.assert_array_equal(a.read(12), b.read(12)), "view 0 is the clean store's tokens"
    keys = {
        spec_hash(store_spec(dataset, encoder, [12], dataclasses.replace(opts, **change), "fp32"))
        for change in ({}, {"view_seed": 1}, {"views": 4}, {"augment": "flip"}, {"views": 1, "augment": None})
    }
    assert len(keys) == 5 and plain.path.name.removesuffix(".zarr").endswith(
        spec_hash(store_spec(dataset, encoder, [12], plain_opts, "fp32"))
    )


def test_pose_signs_follow_a_flip_and_rotations_are_refused(encoder, tmp_path):
    rng = np.random.default_rng(1)
    angles = {k: list(rng.uniform(-40, 40, 10)) for k in ("yaw", "pitch", "roll")}
    spec = write_csv(
        tmp_path / "pose", 10, angles, lambda i: Image.fromarray(rng.integers(0, 255, (H, W, 3), np.uint8))
    )
    dataset = dataclasses.replace(
        load_dataset(spec), flip_sign=("yaw", "roll"), rotation_sensitive=("yaw", "pitch", "roll")
    )
    task = parse_task("regress:yaw,pitch,roll", dataset)
    targets = {task.name: task.targets(dataset)}
    flip = extract(dataset, encoder, tmp_path / "c", ExtractOptions(views=2, augment="flip", **OPTS))
    with TokenStore.open(flip.path) as store:
        y, _ = view_targets(dataset, [task], targets, store.geometry())[task.name]
    np.testing.assert_allclose(y[1], y[0] * [-1, 1, -1], rtol=1e-6)
    turn = extract(dataset, encoder, tmp_path / "c", ExtractOptions(views=2, augment="rotate:20", **OPTS))
    with TokenStore.open(turn.path) as store, pytest.raises(EtfError, match="rotate the faces .* which changes yaw"):
        view_targets(dataset, [task], targets, store.geometry())


def test_fit_over_views_from_memory_and_streamed(faces, encoder, tmp_path):
    """Both read paths train on drawn views with labels that follow; a landmark dataset
    without a mirror map refuses flipped views in one line, and --views clean trains on
    view 0 as a store without views would."""
    dataset, root = faces
    cache = root / "flip:0.5,crop:0.8,rotate:15,shift:0.08,scale:0.1"
    extract(dataset, encoder, cache, ExtractOptions(views=4, augment=cache.name, view_seed=5, **OPTS))
    base = dict(cache_dir=cache, encoders=[TINY_VIT], tasks=["landmarks:lm"], epochs=2, fuser="concat", progress=False)
    memory = fit(dataset, FitConfig(out=tmp_path / "m", feature_aug="drop:0.1,scale:0.1", **base))
    streamed = fit(dataset, FitConfig(out=tmp_path / "s", max_memory=1 << 12, **base))
    assert (memory.metrics["views"], memory.metrics["streamed"]) == (4, False)
    assert (streamed.metrics["views"], streamed.metrics["streamed"]) == (4, True)
    clean = fit(dataset, FitConfig(out=tmp_path / "c", views="clean", **base))
    assert clean.metrics["views"] == 1
    images = [str(dataset.samples[i].path) for i in (4, 9)]  # test samples
    out = CliRunner().invoke(
        main, ["predict", "--run", str(tmp_path / "m"), *images, "--json", str(tmp_path / "p.json")]
    )
    assert out.exit_code == 0, out.output
    assert len(json.loads((tmp_path / "p.json").read_text())) == 2, "predict reads a run trained on views"
    priors = PriorSet(cache, dataset, [TINY_VIT])
    stored = [priors.stores[0].read_layers([12], 0, len(dataset), v)[12] for v in range(4)]
    rows = np.arange(len(dataset))
    for budget in (1 << 30, 1 << 12):  # from memory, streamed
        batches = Batches(priors, rows, budget, 3, seed=0, views=4)
        assert batches.streamed == (budget < 1 << 20)
        seen = []
        for epoch in range(3):
            for idx, views, (tokens,) in batches.train_epoch(rows, epoch):
                for i, v, t in zip(idx, views, tokens):
                    np.testing.assert_array_equal(t.numpy(), stored[v][i])
                    if batches.streamed:  # one seeded view per block and epoch
                        assert (
                            v == draw_views(0, epoch, -(-len(rows) // batches.block_rows), 4)[i // batches.block_rows]
                        )
                seen += list(views)
        assert len(set(seen)) == 4, "every view is drawn"
    priors.close()
    unmirrored = dataclasses.replace(dataset, mirrors={})
    with pytest.raises(EtfError, match="no left/right mirror map for landmarks 'lm'"):
        fit(unmirrored, FitConfig(out=tmp_path / "x", **base))


def test_import_with_a_view_axis(faces, tmp_path):
    dataset, _ = faces
    n = len(dataset)
    rng = np.random.default_rng(2)
    tokens = rng.normal(size=(n, 3, 5, 8)).astype(np.float32)
    geometry = np.tile(np.eye(3), (n, 3, 1, 1))
    geometry[:, 1, 0] = [-1, 0, W]  # view 1 the mirror image
    np.save(tmp_path / "t.npy", tokens)
    np.save(tmp_path / "g.npy", geometry)
    path = import_tokens(
        tmp_path, dataset, "ext", tmp_path / "t.npy", geometry_file=tmp_path / "g.npy", dtype="float32"
    )
    with TokenStore.open(path) as store:
        assert store.views == 3
        for v in range(3):
            np.testing.assert_array_equal(store.read_layers([1], 0, n, v)[1], tokens[:, v])
        assert store._rows("view_flip", 0, n)[:, 1].all() and not store._rows("view_flip", 0, n)[:, 2].any()
    assert verify_store(path) == []
    geometry[3, 0, 0, 2] = 1.0
    np.save(tmp_path / "g.npy", geometry)
    with pytest.raises(EtfError, match="view 0 must be the clean image"):
        import_tokens(tmp_path / "x", dataset, "ext", tmp_path / "t.npy", geometry_file=tmp_path / "g.npy")


def test_resume_of_a_views_store_killed_mid_run(tmp_path):
    root = tmp_path / "faces"
    for i in range(32):
        make_image(root / "ab"[i % 2] / f"{i:02d}.png", seed=i, size=48)
    args = ["extract", "--data", f"folder:{root}", "--encoder", TINY_VIT, "--no-pretrained", "--img-size", "32"]
    args += ["--views", "3", "--augment", "face", "--chunk-rows", "4", "--batch-size", "4", "--workers", "0"]
    args += ["--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(etf_command(*args, "--cache", str(tmp_path / "ref")), check=True, env=env, capture_output=True)
    reference = next((tmp_path / "ref").glob("*/*.zarr"))

    cache = tmp_path / "killed"
    done = kill_after_chunks(args, cache, env)
    assert 3 <= done < 8, "the kill must land mid-extraction"
    assert not list(cache.glob("*/*.zarr"))
    subprocess.run(etf_command(*args, "--cache", str(cache)), check=True, env=env, capture_output=True)
    path = next(cache.glob("*/*.zarr"))
    assert path.name == reference.name
    with TokenStore.open(path) as a, TokenStore.open(reference) as b:
        for name in ("tokens", "views", "view_matrix", "view_flip"):
            np.testing.assert_array_equal(a._rows(name, 0, a.n), b._rows(name, 0, b.n), err_msg=name)
    out = subprocess.run(etf_command("cache", "info", str(path)), env=env, capture_output=True, text=True, check=True)
    assert "views" in out.stdout and "views (32, 2, 1, 5, 192)" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--augment", "flip"], "--augment flip: needs --views K with K >= 2"),
        (["--views", "2", "--augment", "spin"], "unknown part 'spin'"),
    ],
)
def test_bad_view_options_are_one_line(args, message, tmp_path):
    res = subprocess.run(
        etf_command("extract", "--data", "lfw-subset", "--encoder", TINY_VIT, "--cache", str(tmp_path), *args),
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and message in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())


def test_ablate_puts_views_and_feature_aug_on_axes(faces, encoder, tmp_path):
    dataset, root = faces
    extract(dataset, encoder, root / "flip", ExtractOptions(views=4, augment="flip", view_seed=5, **OPTS))
    (tmp_path / "grid.toml").write_text('feature_aug = ["none", "drop:0.1,noise:0.1"]\n')
    args = ["ablate", "--dry-run", "--config", str(tmp_path / "grid.toml"), "--data", f"csv:{root / 'd.csv'}"]
    args += ["--cache", str(root / "flip"), "--encoders", TINY_VIT, "--fusers", "concat", "--task", "landmarks:lm"]
    res = CliRunner().invoke(main, [*args, "--views", "random,clean"])
    assert res.exit_code == 0, res.output
    runs = [line for line in res.output.splitlines() if "fuser=concat" in line]
    assert len(runs) == 4 and {"views=random", "views=clean"} <= set(" ".join(runs).split())
    assert res.output.count("group ") == 2, "feature augmentation is a model setting: one pass per views value"
    bad = CliRunner().invoke(main, [*args, "--views", "random,sideways"])
    assert bad.exit_code != 0 and "--views 'sideways': use random or clean" in bad.output


def test_views_store_from_two_shards_and_in_hdf5_equals_one_process(faces, encoder, tmp_path):
    dataset, root = faces
    opts = ExtractOptions(views=3, augment="flip,crop:0.8", **OPTS)
    one = extract(dataset, encoder, root / "flip,crop:0.8", opts)
    first = extract(dataset, encoder, tmp_path / "s", dataclasses.replace(opts, shard=(0, 2)))
    second = extract(dataset, encoder, tmp_path / "s", dataclasses.replace(opts, shard=(1, 2)))
    assert not first.complete and second.complete and second.path.name == one.path.name
    h5 = extract(dataset, encoder, tmp_path / "h", dataclasses.replace(opts, store="hdf5"))
    with TokenStore.open(one.path) as a, TokenStore.open(second.path) as b, TokenStore.open(h5.path) as c:
        for name in ("tokens", "views", "view_matrix", "view_flip"):
            np.testing.assert_array_equal(a._rows(name, 0, a.n), b._rows(name, 0, b.n), err_msg=name)
            np.testing.assert_array_equal(a._rows(name, 0, a.n), c._rows(name, 0, c.n), err_msg=name)
        assert c._arrays["views"].chunks[1] == 1, "HDF5 chunks hold one view too"
    assert verify_store(h5.path) == []
