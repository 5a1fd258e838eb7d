"""--weights: checkpoints saved by other code bases load into the encoder bit for bit, and
whatever does not fit is reported."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from etf.pipeline.extract.encoders import create_encoder
from tests.conftest import IMG, TINY_VIT


@pytest.fixture(scope="module")
def source():
    """The model whose weights are saved: another seed than the loading side's init."""
    return create_encoder(TINY_VIT, pretrained=False, img_size=IMG, seed=7)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_wrapped_checkpoint_gives_identical_tokens(tmp_path, source, fmt):
    state = {"module." + k: v.contiguous() for k, v in source.model.state_dict().items()}  # as DataParallel saves
    path = tmp_path / f"prior.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        save_file(state, str(path))
    loaded = create_encoder(TINY_VIT, weights=path, img_size=IMG)
    assert loaded.load_report.missing == [] and loaded.load_report.unexpected == []
    assert loaded.weights_sha256 == source.weights_sha256
    assert loaded.init_seed is None and loaded.weights_file == path.name and loaded.pretrained is None
    x = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    for (want, want_layout), (got, got_layout) in zip(source.tokens(x, [6, 12]), loaded.tokens(x, [6, 12])):
        assert torch.equal(got, want) and got_layout == want_layout


def test_missing_and_unexpected_keys_are_reported(tmp_path, source):
    state = dict(source.model.state_dict())
    del state["blocks.0.norm1.weight"]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "prior.pth")
    report = create_encoder(TINY_VIT, weights=tmp_path / "prior.pth", img_size=IMG).load_report
    assert report.missing == ["blocks.0.norm1.weight"] and report.unexpected == ["extra.weight"]
    summary = report.summary()
    assert "missing 1: blocks.0.norm1.weight" in summary and "unused 1: extra.weight" in summary


def test_checkpoint_for_another_input_size_is_resampled(tmp_path, source):
    """A prior trained at 224 px loads into a model built for --img-size (timm's converter)."""
    full = create_encoder(TINY_VIT, pretrained=False, seed=7)  # 224 px, 14x14 position grid, with head
    torch.save(full.model.state_dict(), tmp_path / "prior.pth")
    small = create_encoder(TINY_VIT, weights=tmp_path / "prior.pth", img_size=IMG)
    report = small.load_report
    assert report.mismatched == [] and report.missing == [] and report.loaded_fraction == 1.0
    assert small.model.pos_embed.shape == source.model.pos_embed.shape
    assert torch.equal(small.model.blocks[3].mlp.fc1.weight, full.model.blocks[3].mlp.fc1.weight)
