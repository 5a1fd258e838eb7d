"""Every bad value is one line naming the flag, a non-zero exit and no work done; outputs are
checked before the work that would write them; runs are never silently overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from etf.cli import main
from tests.conftest import IMG, TINY_VIT, make_image
from tests.synthetic import xor_cache


def etf(*args: str | Path, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def error_line(result) -> str:
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def xor(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xor")
    dataset, spec, cache = xor_cache(tmp, n=60)
    return spec, cache


def fit_args(xor, out: Path, *extra: str) -> list:
    spec, cache = xor
    return ["fit", "--data", spec, "--cache", cache, "--encoders", "A,B", "--task", "classify:label",
            "--epochs", "1", "--dim", "16", "--heads", "2", "--out", out, "--no-progress", *extra]  # fmt: skip


@pytest.mark.parametrize(
    "flag, value, named",
    [
        ("--lr", "-1", "--lr"),
        ("--heads", "0", "--heads"),
        ("--depth", "0", "--depth"),
        ("--dropout", "2", "--dropout"),
        ("--train-fraction", "1.5", "--train-fraction"),
        ("--val-fraction", "1.5", "--val-fraction"),
        ("--shots", "0", "--shots"),
        ("--epochs", "0", "--epochs"),
        ("--batch-size", "0", "--batch-size"),
        ("--max-memory", "lots", "--max-memory"),
        ("--mask", "prior:2", "--mask"),
        # past the last GPU: CUDA is missing on a CPU machine, the ordinal is out of range on a GPU one
        ("--device", f"cuda:{max(7, torch.cuda.device_count())}", "--device"),
    ],
)
def test_bad_fit_values_are_one_line_before_any_work(xor, tmp_path, flag, value, named):
    out = tmp_path / "run"
    line = error_line(etf(*fit_args(xor, out, flag, value)))
    assert named in line, line
    assert not out.exists()


def test_outputs_are_checked_before_the_work(xor, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "--out" in error_line(etf(*fit_args(xor, blocker / "sub")))
    spec, _ = xor
    line = error_line(
        etf("extract", "--data", spec, "--encoder", TINY_VIT, "--no-pretrained", "--cache", blocker / "sub")
    )
    assert "--cache" in line and "is a file" in line
    assert "not a directory" in error_line(etf("extract", "--data", f"folder:{blocker}", "--encoder", TINY_VIT))
    assert "--img-size 63" in error_line(
        etf(
            "extract",
            "--data",
            spec,
            "--encoder",
            TINY_VIT,
            "--no-pretrained",
            "--img-size",
            "63",
            "--cache",
            tmp_path / "c",
        )  # fmt: skip
    )
    assert not (tmp_path / "c").exists()
    assert "no such cache directory" in error_line(etf("cache", "ls", tmp_path / "nowhere"))


def test_a_run_is_never_silently_overwritten(xor, tmp_path):
    out = tmp_path / "run"
    first = etf(*fit_args(xor, out))
    assert first.exit_code == 0, first.output
    model = (out / "model.safetensors").read_bytes()
    line = error_line(etf(*fit_args(xor, out, "--seed", "1")))
    assert "--out" in line and "--overwrite" in line
    assert (out / "model.safetensors").read_bytes() == model
    again = etf(*fit_args(xor, out, "--seed", "1", "--overwrite"))
    assert again.exit_code == 0, again.output
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "no staging folder is left beside the run"
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("keep me")
    assert "holds files" in error_line(etf(*fit_args(xor, unrelated)))
    assert (unrelated / "todo.txt").read_text() == "keep me"


def test_a_run_records_absolute_paths_so_it_works_from_anywhere(xor, tmp_path, monkeypatch):
    spec, cache = xor
    monkeypatch.chdir(cache.parent)
    res = etf(*fit_args((spec, Path(cache.name)), Path("relrun")))
    assert res.exit_code == 0, res.output
    config = json.loads((cache.parent / "relrun" / "config.json").read_text())
    assert Path(config["cache_dir"]).is_absolute() and Path(config["cache_dir"]) == cache.resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shares = etf("explain", "--run", cache.parent / "relrun", "--split", "test", "--out", "maps")
    assert shares.exit_code == 0, shares.output
    assert (elsewhere / "maps" / "shares_test.json").exists()


def test_predict_refuses_unreadable_images_and_unwritable_outputs(tmp_path, folder_dataset):
    cache = tmp_path / "cache"
    data = f"folder:{folder_dataset}"
    res = etf("extract", "--data", data, "--encoder", TINY_VIT, "--no-pretrained", "--img-size", IMG,
              "--cache", cache, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    res = etf("fit", "--data", data, "--cache", cache, "--encoders", TINY_VIT, "--fuser", "linear", "--epochs", "1",
              "--out", tmp_path / "run", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    good = make_image(tmp_path / "good.png", seed=1)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(make_image(tmp_path / "whole.jpg", seed=2).read_bytes()[:300])
    assert "not an image" in error_line(etf("predict", "--run", tmp_path / "run", good, text))
    assert "cut.jpg" in error_line(etf("predict", "--run", tmp_path / "run", truncated))
    line = error_line(etf("predict", "--run", tmp_path / "run", good, "--json", tmp_path / "missing" / "x.json"))
    assert "--json" in line and "does not exist" in line
    ok = etf("predict", "--run", tmp_path / "run", good)
    assert ok.exit_code == 0 and "label_confidence" in ok.output


def test_pretrained_weights_fail_fast_when_the_hub_is_unreachable(folder_dataset, tmp_path):
    """A hub that refuses connections: one line naming HF_HUB_OFFLINE and --weights, not a
    minute of retries (the probe says unreachable, so no download is even tried)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    res = subprocess.run(
        [sys.executable, "-m", "etf.cli", "extract", "--data", f"folder:{folder_dataset}", "--encoder", "vit_t",
         "--cache", str(tmp_path / "c")],  # fmt: skip
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert "cannot be reached" in line and "HF_HUB_OFFLINE" in line and "--weights" in line


def test_help_and_listing_commands_do_not_import_torch():
    code = (
        "import sys; from click.testing import CliRunner; from etf.cli import main\n"
        "for args in (['--help'], ['fit', '--help'], ['export', '--help'], ['ablate', '--help'], ['probe', '--help'],\n"
        "             ['data', 'list'],\n"
        "             ['cache', '--help']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
        "heavy = [m for m in ('torch', 'timm', 'sklearn', 'zarr', 'torchvision') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_both_encoder_spellings_work_everywhere(xor, tmp_path):
    spec, cache = xor
    res = etf("ablate", "--data", spec, "--cache", cache, "--encoder", "A", "--encoder", "B", "--task",
              "classify:label", "--dry-run")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "A+B" in res.output and "-" in res.output  # no --out: statuses are not looked up


def test_overwrite_replaces_only_a_run_etf_wrote(xor, tmp_path):
    """--overwrite never deletes a cache, a folder of other files or a user's file put into a
    run; ablate --out, explain --out and predict --embed refuse the same folders."""
    spec, cache = xor
    before = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
    line = error_line(etf(*fit_args(xor, cache, "--overwrite")))
    assert "--out" in line and "token cache" in line, line
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == before
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    assert "thesis.tex" in error_line(etf(*fit_args(xor, thesis, "--overwrite")))
    assert (thesis / "thesis.tex").read_text() == "years of work"
    run = tmp_path / "run"
    assert etf(*fit_args(xor, run)).exit_code == 0
    (run / "notes.txt").write_text("mine")
    assert "notes.txt" in error_line(etf(*fit_args(xor, run, "--overwrite")))
    assert (run / "notes.txt").read_text() == "mine"
    (run / "notes.txt").unlink()
    assert etf(*fit_args(xor, run, "--overwrite", "--seed", "2")).exit_code == 0
    assert not list(tmp_path.glob(".run.*")), "no staging folder is left beside the run"
    for args in (
        ["ablate", "--data", spec, "--cache", cache, "--encoders", "A,B", "--task", "classify:label", "--out", thesis],
        ["ablate", "--data", spec, "--cache", cache, "--encoders", "A,B", "--task", "classify:label", "--out", run],
        ["explain", "--run", run, "--split", "test", "--out", thesis],
        ["explain", "--run", run, "--split", "test", "--out", cache],
        ["predict", "--run", run, "--data", spec, "--embed", thesis],
    ):
        line = error_line(etf(*args))
        assert "--out" in line or "--embed" in line, line
    assert (thesis / "thesis.tex").read_text() == "years of work"
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == before
    maps = tmp_path / "maps"
    for _ in range(2):  # explain writes into its own folder again
        res = etf("explain", "--run", run, "--split", "test", "--out", maps)
        assert res.exit_code == 0, res.output
    assert "explain directory, not a run" in error_line(etf(*fit_args(xor, maps, "--overwrite")))


def test_staging_leftovers_etf_did_not_write_are_kept(xor, tmp_path):
    """A folder that happens to bear a staging name is the user's: refused, not removed."""
    (tmp_path / ".run.partial").mkdir()
    (tmp_path / ".run.partial" / "keep.txt").write_text("mine")
    line = error_line(etf(*fit_args(xor, tmp_path / "run")))
    assert ".run.partial" in line
    assert (tmp_path / ".run.partial" / "keep.txt").read_text() == "mine"
