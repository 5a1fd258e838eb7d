"""The exported model (``etf export``) under onnxruntime against the bare canonical encoder in
torch, both on the CPU, and the exported graph's FLOPs against the canonical encoder's.

    python bench/export.py [--encoder vit_tiny_patch16_224] [--batch 32] [--repeat 5]

A run is fitted on lfw-subset (random-init canonical ``--encoder`` plus resnet18, ET-Fuser,
two epochs), then exported. Timed on the same batch of images, same threads, median of
``--repeat`` passes after a warm-up:

- baseline: the canonical encoder's ``tokens`` in torch on preprocessed float input;
- the canonical encoder alone exported to ONNX (same exporter) under onnxruntime, which
  separates the runtime's speed from what the fuser and heads add;
- the exported model under onnxruntime on uint8 input (normalisation, token rounding, fuser
  at canonical inference and heads included).

FLOPs: the exported graph's (``graph_flops``: Conv, Gemm, MatMul) over the canonical
encoder's, both as the store recorded them (torch's counter) and as the same graph counter
gives them for the encoder alone; the goal is at most 1.01x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from click.testing import CliRunner  # noqa: E402

from etf.cli import main as cli  # noqa: E402


def invoke(*args: object) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exit_code:
        raise SystemExit(res.output)
    return res.output


def median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="vit_tiny_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    import onnx
    import onnxruntime as ort

    from etf.pipeline.extract.external import graph_flops
    from etf.pipeline.fit.export import export_run
    from etf.pipeline.fit.predict import load_predictor
    from etf.utils import read_json

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = ["--data", "lfw-subset", "--cache", tmp / "cache", "--no-progress"]
        invoke("extract", *data, "--encoder", args.encoder, "--encoder", "resnet18", "--no-pretrained")
        fit_out = invoke("fit", *data, "--encoders", f"{args.encoder},resnet18", "--out", tmp / "run", "--epochs", 2)
        card = export_run(tmp / "run", tmp / "model.onnx")
        encoder = load_predictor(tmp / "run", device="cpu", infer="canonical").encoders[0]
        spec = read_json(tmp / "run" / "stores.json")[0]
        layers = spec["spec"]["layers"]
        encoder_flops = spec["info"]["flops_per_image"]

        size = card["input"]["shape"][1:3]
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (args.batch, *size, 3), dtype=np.uint8)
        cfg = encoder.data_config
        mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std

        class Bare(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return encoder.tokens.__wrapped__(encoder, x, layers)[-1][0]

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Bare(), (x[:2],), str(tmp / "bare.onnx"), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}}
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        exported = ort.InferenceSession(str(tmp / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        bare = ort.InferenceSession(str(tmp / "bare.onnx"), opts, providers=["CPUExecutionProvider"])
        xn = x.numpy()

        def torch_forward() -> None:
            encoder.tokens(x, layers)

        rows = [
            ("canonical encoder, torch (baseline)", median_seconds(torch_forward, args.repeat)),
            ("canonical encoder alone, onnxruntime", median_seconds(lambda: bare.run(None, {"x": xn}), args.repeat)),
            (
                "etf export model, onnxruntime",
                median_seconds(lambda: exported.run(None, {"images": pixels}), args.repeat),
            ),
        ]
        flops = graph_flops(onnx.load(str(tmp / "model.onnx")), "images", (1, *size, 3))
        bare_flops = graph_flops(onnx.load(str(tmp / "bare.onnx")), "x", (1, 3, *size))
        fuser = next(line for line in fit_out.splitlines() if "MFLOPs/sample" in line)

    base = rows[0][1]
    print(f"{args.encoder} at {size[0]}x{size[1]}, batch {args.batch}, {threads} threads, CPU")
    print(f"{'':40} {'img/s':>8} {'ratio':>6}")
    for name, sec in rows:
        print(f"{name:40} {args.batch / sec:8.1f} {base / sec:6.2f}")
    print(f"FLOPs/image, canonical encoder: {encoder_flops / 1e9:.4f} G (torch counter, baseline)")
    print(f"  the encoder alone's ONNX graph: {bare_flops / 1e9:.4f} G ({bare_flops / encoder_flops:.4f}x)")
    print(
        f"  the exported model's graph:     {flops / 1e9:.4f} G ({flops / encoder_flops:.4f}x; "
        f"{flops / bare_flops:.4f}x the encoder's graph, same counter: goal <= 1.01)"
    )
    print(f"  etf fit's report: {fuser.strip()}")


if __name__ == "__main__":
    main()
