"""Extraction: parity with a direct timm forward, content addressing, resume, shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from etf.cache.store import TokenStore
from etf.data import load_dataset
from etf.errors import EtfError
from etf.pipeline.extract.encoders import create_encoder
from etf.pipeline.extract.run import ExtractOptions, extract
from tests.conftest import IMG, TINY_VIT, kill_after_chunks

#: on the CPU, where extraction runs in fp32 and matches a direct forward of the caller's model to
#: float error; the default device (a GPU's bf16 autocast) is compared with it in
#: test_extraction_on_the_default_device_leaves_the_encoder_where_it_was
OPTS = dict(workers=0, progress=False, device="cpu")


def _direct_tokens(dataset, encoder, layers):
    """The reference: timm's own forward_intermediates on the same preprocessed batch."""
    tf = encoder.transform()
    x = torch.stack([tf(dataset.load_image(i)) for i in range(len(dataset))])
    idx = [layer - 1 for layer in layers]
    m = encoder.model
    if encoder.is_vit:
        out = m.forward_intermediates(
            x, indices=idx, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        return [torch.cat([p, t], 1).numpy() for t, p in out]
    out = m.forward_intermediates(x, indices=idx, norm=True, intermediates_only=True)
    return [f.flatten(2).transpose(1, 2).numpy() for f in out]


@pytest.mark.parametrize("store", ["zarr", "hdf5"])
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_tokens_match_direct_timm_forward(folder_dataset, tmp_path, kind, store, tiny_vit, tiny_cnn):
    dataset = load_dataset(f"folder:{folder_dataset}")
    encoder = tiny_vit if kind == "vit" else tiny_cnn
    layers = [2, 4] if kind == "vit" else [3, 5]  # CNN stages of different shapes
    res = extract(dataset, encoder, tmp_path / "c", ExtractOptions(layers=layers, store=store, chunk_rows=5, **OPTS))
    assert res.complete and res.path.suffix == (".h5" if store == "hdf5" else ".zarr")
    ref = _direct_tokens(dataset, encoder, layers)
    with TokenStore.open(res.path) as s:
        assert s.n == len(dataset) and s.layers == layers
        for layer, want in zip(layers, ref):
            got = s.read(layer)
            assert got.dtype == np.float16 and got.shape == want.shape
            np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
        if kind == "vit":
            assert [a.name for a in s.array_specs] == ["tokens"]
            assert s.layouts[2].prefix == 1 and s.layouts[2].grid == (2, 2)
        else:
            assert [a.name for a in s.array_specs] == ["tokens_3", "tokens_5"]
            assert s.layouts[5].prefix == 0


def test_token_selections_and_dtypes(folder_dataset, tmp_path, tiny_vit):
    dataset = load_dataset(f"folder:{folder_dataset}")
    full = extract(dataset, tiny_vit, tmp_path, ExtractOptions(dtype="float32", **OPTS))
    with TokenStore.open(full.path) as s:
        ref = s.read(12)
    for mode, want in (
        ("cls", ref[:, :1]),
        ("patch", ref[:, 1:]),
        ("pool:1", np.concatenate([ref[:, :1], ref[:, 1:].mean(1, keepdims=True)], 1)),
    ):
        res = extract(dataset, tiny_vit, tmp_path, ExtractOptions(tokens=mode, dtype="float32", **OPTS))
        with TokenStore.open(res.path) as s:
            np.testing.assert_allclose(s.read(12), want, rtol=1e-5, atol=1e-5)
    bf = extract(dataset, tiny_vit, tmp_path, ExtractOptions(dtype="bfloat16", **OPTS))
    with TokenStore.open(bf.path) as s:
        got = s.read(12)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, torch.from_numpy(ref).bfloat16().float().numpy())


def test_every_spec_change_makes_a_new_store(folder_dataset, tmp_path, tiny_vit):
    dataset = load_dataset(f"folder:{folder_dataset}")
    base = extract(dataset, tiny_vit, tmp_path, ExtractOptions(**OPTS)).path
    again = extract(dataset, tiny_vit, tmp_path, ExtractOptions(**OPTS))
    assert again.path == base and again.samples_done == 0  # found complete, nothing recomputed
    variants = [
        ExtractOptions(layers=[3], **OPTS),
        ExtractOptions(tokens="cls", **OPTS),
        ExtractOptions(dtype="float32", **OPTS),
        ExtractOptions(norm=False, **OPTS),
    ]
    paths = {extract(dataset, tiny_vit, tmp_path, o).path for o in variants}
    other_seed = create_encoder(TINY_VIT, pretrained=False, img_size=IMG, seed=1)
    other_size = create_encoder(TINY_VIT, pretrained=False, img_size=48)
    paths |= {extract(dataset, e, tmp_path, ExtractOptions(**OPTS)).path for e in (other_seed, other_size)}
    relabelled = load_dataset(f"folder:{folder_dataset}")
    relabelled.samples[0] = type(relabelled.samples[0])(**{**relabelled.samples[0].__dict__, "labels": {"label": 1}})
    paths.add(extract(relabelled, tiny_vit, tmp_path, ExtractOptions(**OPTS)).path)
    assert base not in paths and len(paths) == 7


def test_extraction_on_the_default_device_leaves_the_encoder_where_it_was(folder_dataset, tmp_path, tiny_vit):
    """--device auto: on a CPU-only machine the CPU (the same store, found); on a GPU the GPU with
    bf16 autocast (fp16 where bf16 is missing), a store of its own (precision is in the spec)
    whose tokens agree with the CPU's fp32 ones to half precision's rounding, a few parts in a
    thousand per block. Either way the caller's encoder is still on the CPU and runs there."""
    dataset = load_dataset(f"folder:{folder_dataset}")
    opts = {**OPTS, "layers": [2]}
    cpu = extract(dataset, tiny_vit, tmp_path, ExtractOptions(**opts))
    auto = extract(dataset, tiny_vit, tmp_path, ExtractOptions(**{**opts, "device": "auto"}))
    assert {p.device.type for p in tiny_vit.model.parameters()} == {"cpu"}
    x = torch.stack([tiny_vit.transform()(dataset.load_image(0))])
    ((tokens, _),) = tiny_vit.tokens(x, [2])
    assert tokens.device.type == "cpu"
    if not torch.cuda.is_available():
        assert auto.path == cpu.path and auto.samples_done == 0
        return
    assert auto.path != cpu.path and auto.complete
    with TokenStore.open(cpu.path) as a, TokenStore.open(auto.path) as b:
        want, got = a.read(2).astype(np.float32), b.read(2).astype(np.float32)
    assert np.linalg.norm(got - want) <= 0.03 * np.linalg.norm(want)


def test_random_init_is_reproducible(tiny_vit):
    again = create_encoder(TINY_VIT, pretrained=False, img_size=IMG)
    assert again.weights_sha256 == tiny_vit.weights_sha256
    assert create_encoder(TINY_VIT, pretrained=False, img_size=IMG, seed=3).weights_sha256 != tiny_vit.weights_sha256


def _etf(*args: str) -> list[str]:
    return [sys.executable, "-m", "etf.cli", *args]


def _read_all(path: Path) -> np.ndarray:
    with TokenStore.open(path) as s:
        return s.read(s.layers[0])


def test_resume_after_sigkill_gives_identical_arrays(tmp_path):
    args = [
        "extract",
        "--data",
        "lfw-subset",
        "--encoder",
        TINY_VIT,
        "--no-pretrained",
        "--img-size",
        "64",
        "--chunk-rows",
        "8",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_etf(*args, "--cache", str(tmp_path / "ref")), check=True, env=env, capture_output=True)
    ref_path = next((tmp_path / "ref").glob("*/*.zarr"))

    cache = tmp_path / "killed"
    done = kill_after_chunks(args, cache, env)
    partial = next(cache.glob("*/*.partial"))
    assert 3 <= done < 25, "the kill must land mid-extraction"
    assert not list(cache.glob("*/*.zarr")), "no complete store may exist after a kill"
    with pytest.raises(EtfError, match="incomplete"):
        TokenStore.open(partial.with_name(partial.name.removesuffix(".partial")))

    out = subprocess.run(_etf(*args, "--cache", str(cache)), check=True, env=env, capture_output=True, text=True)
    assert "img/s" in out.stdout
    path = next(cache.glob("*/*.zarr"))
    assert path.name == ref_path.name and not partial.exists()
    np.testing.assert_array_equal(_read_all(path), _read_all(ref_path))


def test_two_shards_give_the_same_store_as_one_process(tmp_path):
    args = [
        "extract",
        "--data",
        "lfw-subset",
        "--encoder",
        TINY_VIT,
        "--no-pretrained",
        "--img-size",
        "32",
        "--chunk-rows",
        "16",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_etf(*args, "--cache", str(tmp_path / "one")), check=True, env=env, capture_output=True)
    procs = [
        subprocess.Popen(
            _etf(*args, "--cache", str(tmp_path / "two"), "--shard", f"{i}/2"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()
    one, two = next((tmp_path / "one").glob("*/*.zarr")), next((tmp_path / "two").glob("*/*.zarr"))
    assert one.name == two.name and not list((tmp_path / "two").glob("*/*.partial"))
    np.testing.assert_array_equal(_read_all(one), _read_all(two))


def test_spawned_dataloader_workers_read_the_store(folder_dataset, tmp_path, tiny_vit):
    from torch.utils.data import DataLoader

    dataset = load_dataset(f"folder:{folder_dataset}")
    res = extract(dataset, tiny_vit, tmp_path, ExtractOptions(chunk_rows=8, **OPTS))
    store = TokenStore.open(res.path)
    loader = DataLoader(_Blocks(store), batch_size=None, num_workers=2, multiprocessing_context="spawn")
    got = np.concatenate([b.numpy() for b in loader])
    np.testing.assert_array_equal(got, store.read(12))


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return -(-self.store.n // self.store.chunk_rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        c = self.store.chunk_rows
        return torch.from_numpy(self.store.read(12, i * c, min(self.store.n, (i + 1) * c)))


def test_probe_gives_shapes_and_flops_up_to_the_requested_layers(tiny_vit):
    (six,), flops6 = tiny_vit.probe([6])
    (_, twelve), flops12 = tiny_vit.probe([6, 12])
    assert six[0].shape == twelve[0].shape == (1, 5, 192) and six[1].grid == (2, 2)
    assert 0 < flops6 < flops12 < 2.2 * flops6  # blocks 7-12 cost what blocks 1-6 do


def test_blocks_after_the_last_layer_are_not_run(tiny_cnn):
    _, flops3 = tiny_cnn.probe([3])
    _, flops5 = tiny_cnn.probe([3, 5])
    assert flops3 < 0.7 * flops5


def test_an_image_changed_in_place_never_reuses_its_old_tokens(folder_dataset, tmp_path, tiny_vit):
    """Same name, same size, even the old modification time restored: the content is new,
    so the store is new, and the old tokens are not read for it."""
    first = load_dataset(f"folder:{folder_dataset}")
    old = extract(first, tiny_vit, tmp_path, ExtractOptions(**OPTS))
    image = first.samples[3].path
    before = image.stat()
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)  # noise inverted: same PNG size
    assert image.stat().st_size == before.st_size
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    edited = load_dataset(f"folder:{folder_dataset}")
    assert edited.ids == first.ids and edited.key != first.key
    new = extract(edited, tiny_vit, tmp_path, ExtractOptions(**OPTS))
    assert new.path != old.path and new.samples_done == len(edited)
    with TokenStore.open(old.path) as a, TokenStore.open(new.path) as b:
        changed = np.abs(a.read(12) - b.read(12)).reshape(len(edited), -1).max(axis=1) > 0
    assert changed.tolist() == [i == 3 for i in range(len(edited))]


def test_extract_into_a_read_only_cache_that_has_every_store_says_found(folder_dataset, tmp_path):
    """Nothing is written when every store is complete, so a cache a lab shares read-only
    serves: found, exit 0. (Made read-only too; root writes through that, which the check of
    every file's change time still catches.)"""
    from click.testing import CliRunner

    from etf.cli import main

    cache = tmp_path / "cache"
    args = ["extract", "--data", f"folder:{folder_dataset}", "--encoder", TINY_VIT, "--no-pretrained",
            "--img-size", str(IMG), "--workers", "0", "--no-progress", "--device", "cpu", "--cache", str(cache)]  # fmt: skip
    assert CliRunner().invoke(main, args).exit_code == 0

    def state() -> dict[Path, tuple[int, int]]:  # a write replaces an inode or touches its folder's mtime
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [cache, *cache.rglob("*")]}

    before = state()
    for p in before:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        res = CliRunner().invoke(main, args)
    finally:
        for p in before:
            p.chmod(p.stat().st_mode | 0o200)
    assert res.exit_code == 0, res.output
    assert f"{TINY_VIT}: found complete" in res.output
    assert state() == before, "nothing is written"
