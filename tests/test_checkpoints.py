"""Face-pretrained priors: foreign checkpoint layouts load into timm with identical outputs.

Each checkpoint is made here from a random-init model, written in the foreign layout (key
names, wrappers, prefixes, heads of the code base that publishes such weights).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import timm
import torch

from etf.errors import EtfError
from etf.pipeline.extract.checkpoints import adapt_state_dict, load_into
from etf.pipeline.extract.encoders import create_encoder
from tests.conftest import IMG, TINY_VIT


def _images(size: int = IMG) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_torchvision_resnet50_with_moco_prefixes(tmp_path):
    """FRA/FRL-style ResNet-50: torchvision key names under ``module.encoder_q.`` next to
    a momentum encoder, a queue and a ``fc`` head."""
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet50().eval()
    state = {f"module.encoder_q.{k}": v for k, v in source.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v for k, v in source.state_dict().items()}  # shared storage: a small file
    state["module.queue"] = torch.randn(128, 64)
    torch.save({"state_dict": state, "epoch": 200}, tmp_path / "fra_r50.pth")

    enc = create_encoder("resnet50", pretrained=False, weights=tmp_path / "fra_r50.pth", img_size=64, seed=5)
    x = _images(64)
    with torch.no_grad():
        expected = torch.nn.Sequential(*list(source.children())[:-2])(x)
    ((got, layout),) = enc.tokens(x, [5])
    torch.testing.assert_close(got, expected.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)
    report = enc.load_report
    assert report.loaded_fraction == 1.0 and not report.missing
    assert "fc.weight" in report.unexpected and "queue" in report.unexpected
    assert any(k.startswith("encoder_k.") for k in report.unexpected)


def test_query_encoder_wins_over_an_equally_fitting_momentum_encoder():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    state = {
        f"encoder_{e}.{k}": torch.full_like(v, i) for i, e in enumerate("kq") for k, v in model.state_dict().items()
    }
    load_into(model, adapt_state_dict(state, model), Path("moco.pth"), allow_partial=False)
    assert model[0].weight.eq(1).all()


def _vit(img_size: int, **kw) -> torch.nn.Module:
    torch.manual_seed(img_size)
    return timm.create_model(TINY_VIT, pretrained=False, img_size=img_size, num_classes=0, **kw).eval()


def _mae_checkpoint(model: torch.nn.Module) -> dict:
    """MAE/MIM layout: a ``model`` wrapper, the encoder under ``encoder.``, its final norm as
    fine-tuning's ``fc_norm``, and the pre-training decoder beside it."""
    enc = {("encoder." + k).replace("encoder.norm.", "encoder.fc_norm."): v for k, v in model.state_dict().items()}
    decoder = {
        "mask_token": torch.zeros(1, 1, 96),
        "decoder_embed.weight": torch.randn(96, 192),
        "decoder_pred.weight": torch.randn(768, 96),
    }
    return {"model": enc | decoder, "optimizer": {}, "epoch": 799}


def test_mae_vit_with_encoder_prefix_and_fc_norm(tmp_path):
    source = _vit(IMG)
    torch.save(_mae_checkpoint(source), tmp_path / "mae_face.pth")
    enc = create_encoder(TINY_VIT, pretrained=False, weights=tmp_path / "mae_face.pth", img_size=IMG, seed=9)
    x = _images()
    with torch.no_grad():
        expected = source.forward_features(x)
    ((got, layout),) = enc.tokens(x, [12])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert enc.load_report.loaded_fraction == 1.0 and not enc.load_report.missing
    # the decoder is reported unused (timm's converter drops ``mask_token`` itself)
    assert {"decoder_embed.weight", "decoder_pred.weight"} <= set(enc.load_report.unexpected)


def test_mae_pos_embed_of_another_grid_is_resampled():
    from timm.layers import resample_abs_pos_embed

    source, target = _vit(64), _vit(IMG)  # 4x4 and 2x2 patch grids
    state = adapt_state_dict({k.removeprefix("model."): v for k, v in _mae_checkpoint(source)["model"].items()}, target)
    report = load_into(target, state, Path("mae_face.pth"), allow_partial=False)
    assert report.loaded_fraction == 1.0 and not report.mismatched
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[2, 2], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)


def to_openai_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm CLIP ViT names back to OpenAI-CLIP's (the inverse of timm's ``_convert_openai_clip``)."""
    swaps = [
        (r"^patch_embed\.proj\.", "conv1."),
        (r"^pos_embed$", "positional_embedding"),
        (r"^cls_token$", "class_embedding"),
        (r"^norm_pre\.", "ln_pre."),
        (r"^norm\.", "ln_post."),
        (r"^blocks\.", "transformer.resblocks."),
        (r"\.norm([12])\.", r".ln_\1."),
        (r"\.attn\.qkv\.", ".attn.in_proj_"),
        (r"\.attn\.proj\.", ".attn.out_proj."),
        (r"\.mlp\.fc1\.", ".mlp.c_fc."),
        (r"\.mlp\.fc2\.", ".mlp.c_proj."),
    ]
    out = {}
    for k, v in state.items():
        if k == "head.bias":
            continue
        if k == "head.weight":
            out["visual.proj"] = v.T
            continue
        for pattern, repl in swaps:
            k = re.sub(pattern, repl, k)
        if k in ("class_embedding", "positional_embedding"):
            v = v.reshape(v.shape[-2:]) if k == "positional_embedding" else v.reshape(-1)
        out["visual." + k] = v
    return out


def test_openai_clip_layout_vit_b16_as_farl_ships_it():
    """FaRL: the OpenAI-CLIP layout of a ViT-B/16 visual tower, next to a text tower."""
    torch.manual_seed(2)
    source = timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=IMG, num_classes=512).eval()
    state = to_openai_clip(source.state_dict())
    assert {
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.ln_pre.weight",
        "visual.ln_post.weight",
        "visual.proj",
        "visual.transformer.resblocks.11.attn.in_proj_weight",
    } <= set(state)
    state |= {
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4),
        "positional_embedding": torch.randn(77, 4),
        "token_embedding.weight": torch.randn(10, 4),
        "logit_scale": torch.ones(()),
    }
    target = copy.deepcopy(source)  # the same architecture, as create_encoder makes it: no head, other weights
    target.reset_classifier(0)
    for p in target.parameters():
        p.data.zero_()
    report = load_into(target, adapt_state_dict(state, target), Path("farl.pth"), allow_partial=False)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(x), source.forward_features(x), rtol=0, atol=1e-5)
    assert report.loaded_fraction == 1.0 and not report.missing
    assert {"positional_embedding", "token_embedding.weight", "head.weight"} <= set(report.unexpected)


def test_checkpoint_that_leaves_most_of_the_model_random_is_refused(tmp_path):
    torch.save({"conv1.weight": torch.randn(64, 3, 7, 7), "fc.weight": torch.randn(10, 512)}, tmp_path / "r18.pth")
    with pytest.raises(EtfError, match=r"--weights .*r18.pth: does not fit .*--allow-partial"):
        create_encoder(TINY_VIT, pretrained=False, weights=tmp_path / "r18.pth", img_size=IMG)
    source = _vit(IMG)
    some = {k: v for k, v in source.state_dict().items() if not re.match(r"blocks\.[0-7]\.", k)}  # 4 of 12 blocks
    torch.save({"model": some}, tmp_path / "some.pth")
    with pytest.raises(EtfError, match="does not fit"):
        create_encoder(TINY_VIT, pretrained=False, weights=tmp_path / "some.pth", img_size=IMG)
    enc = create_encoder(TINY_VIT, pretrained=False, weights=tmp_path / "some.pth", img_size=IMG, allow_partial=True)
    assert 0 < enc.load_report.loaded_fraction < 0.5 and "blocks.0.attn.qkv.weight" in enc.load_report.missing
