"""Integer vs fake-quantized inference of calibrated bundled-model runs: per-block SQNR and the test metrics.

    python benchmarks/integer_agreement.py runs/quality/ptq4dit_w4a8 runs/quality/ditas_w4a8 [--num-samples 1000]

Each RUN is a ``default_root_dir`` where ``ditquant fit`` and ``ditquant test`` already ran (e.g. by
``benchmarks/bundled_quality.py``). Per run: the calibrated model (``RUN/quantized``) is converted to integers and
every transformer block is compared with its fake-quantized self on the same inputs — the fake model's block inputs
along the FP sampler's trajectory (8 labels, 5 of the sampler's steps); then ``ditquant test --model.backend
integer`` samples with the run's own resolved config into ``RUN-integer`` and its metrics are printed next to the
fake-quantized ones.

The integer model computes the same codes as the fake model, but sums each GEMM exactly (int32) where the fake model
sums in float32; the sampler turns such rounding differences into different trajectories for many samples. The
yardstick for its difference (``--reorder N``): the fake-quantized model sampled N more times with each quantized
linear's input channels in a seeded random order (k = 1..N, into ``RUN-reordered-k``) — the same arithmetic, summed
in another float order. The fake model's FID over its 1 + N orders gives a mean and a standard deviation. Each
variant's samples are also compared with the fake model's one by one (PSNR over 8-bit pixels).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from torchmetrics.functional.image import peak_signal_noise_ratio

from ditquant.diffusion.samplers import SamplerConfig, sample
from ditquant.integer.agreement import block_sqnr
from ditquant.export.command import load_calibrated, quantized_folder
from ditquant.integer.convert import to_integer

# ``ditquant test`` (arguments after the first) with every quantized linear's sums reordered, seeded by the first
REORDERED_TEST = """
import sys
from ditquant.cli import main
from ditquant.integer.agreement import reordered_sums
with reordered_sums(int(sys.argv[1])):
    main(sys.argv[2:])
"""


def block_agreement(run: Path, sampler: SamplerConfig, steps: int = 5) -> list[float]:
    loaded, _, _ = load_calibrated(quantized_folder(run))
    fake = loaded.transformer
    integer = to_integer(fake)
    c = loaded.config
    labels = torch.arange(8) % c.num_classes
    noise = torch.randn(8, c.in_channels, c.input_size, c.input_size, generator=torch.Generator().manual_seed(0))
    visit = set(torch.linspace(0, sampler.num_steps - 1, steps).round().int().tolist())
    results: list[float] = []

    def on_step(i, t, x):
        if i in visit:
            both = torch.cat([labels, torch.full_like(labels, c.num_classes)])  # the guided batch: cond + null
            results.extend(block_sqnr(fake, integer, torch.cat([x, x]), torch.full((len(both),), t), both))

    with torch.no_grad():
        sample(fake, noise, labels, sampler, torch.Generator().manual_seed(1), on_step=on_step)
    return results


def sample_psnr(test: Path, reference: Path) -> np.ndarray:
    """PSNR (dB, 8-bit pixels) of every sample in ``test/samples.npz`` against the same sample in ``reference``'s
    (inf where identical)."""
    with np.load(test / "samples.npz") as a, np.load(reference / "samples.npz") as b:
        x, y = torch.from_numpy(a["arr_0"]).double(), torch.from_numpy(b["arr_0"]).double()
    return peak_signal_noise_ratio(x, y, data_range=255.0, reduction="none", dim=tuple(range(1, x.dim()))).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--blocks-only", action="store_true", help="per-block SQNR only (no integer test run)")
    p.add_argument("--reorder", type=int, default=0, metavar="N", help="also test the fake-quantized model N "
                   "more times with each quantized linear's input channels in a seeded random order (the yardstick)")
    p.add_argument("--fp-reference", type=Path, help="an FP test folder for the integer runs' FID / PSNR vs FP "
                   "(model.evaluation.fp_reference) instead of sampling the FP model again")
    args = p.parse_args()
    fid_rows, divergence_rows = [], []

    def test_once(run: Path, config: Path, out: Path, *overrides: str, wrapper: tuple[str, ...] = ()) -> dict:
        """``ditquant test`` of ``run``'s checkpoint with its own config and ``overrides`` into ``out`` (once), run
        through ``wrapper`` (``-c SCRIPT ARGS...``) if given; returns the test folder and its metrics."""
        if not (out / "test" / "metrics.json").is_file():
            subprocess.run([sys.executable, *(wrapper or ["-m", "ditquant"]), "test", "--config", str(config),
                            "--trainer.default_root_dir", str(out), "--ckpt_path",
                            str(run / "checkpoints" / "last.ckpt"), "--data.num_test_samples", str(args.num_samples),
                            "--trainer.enable_progress_bar", "false", *overrides,
                            *(["--model.evaluation.fp_reference", str(args.fp_reference)] if args.fp_reference else [])],
                           check=True)
        return {"folder": out / "test", **json.loads((out / "test" / "metrics.json").read_text())}

    for run in args.runs:
        config = run / "test" / "config.yaml"
        resolved = yaml.safe_load(config.read_text()) if config.is_file() else {"model": {"sampler": {}}}
        sqnr = block_agreement(run, SamplerConfig(**resolved["model"]["sampler"]))
        if args.blocks_only:
            print(f"{run.name}: block SQNR min {min(sqnr):.1f} dB, mean {sum(sqnr) / len(sqnr):.1f} dB over "
                  f"{len(sqnr)} block calls")
            continue
        fake = {"folder": run / "test", **json.loads((run / "test" / "metrics.json").read_text())}
        integer = test_once(run, config, run.parent / f"{run.name}-integer", "--model.backend", "integer")
        reordered = [test_once(run, config, run.parent / f"{run.name}-reordered-{k}",
                               wrapper=("-c", REORDERED_TEST, str(k))) for k in range(1, args.reorder + 1)]
        fid_rows.append((run.name, min(sqnr), sum(sqnr) / len(sqnr), fake, integer, reordered))
        for label, test in [("integer", integer), *((f"fake, order {k}", q) for k, q in enumerate(reordered, 1))]:
            psnr = sample_psnr(test["folder"], fake["folder"])
            divergence_rows.append((run.name, label, float(np.median(psnr)), int((psnr < 20).sum()),
                                    int((psnr > 40).sum()), len(psnr)))
    if not fid_rows:
        return
    print(f"\n{args.num_samples} samples; block SQNR over {len(sqnr)} block calls per run\n")
    draws = args.reorder > 0
    print("| run | block SQNR min / mean (dB) | FID vs data fake / integer (difference) "
          + (f"| fake, {1 + args.reorder} summation orders: mean ± std [min, max] | integer − mean " if draws else "")
          + "| FID vs FP fake / integer | PSNR vs FP fake / integer (dB) |")
    print("|---|---|---|" + ("---|---|" if draws else "") + "---|---|")
    for name, lo, mean, f, i, reordered in fid_rows:
        spread = ""
        if draws:
            fids = np.array([f["fid_vs_data"], *(q["fid_vs_data"] for q in reordered)])
            spread = (f" {fids.mean():.3f} ± {fids.std(ddof=1):.3f} [{fids.min():.3f}, {fids.max():.3f}] | "
                      f"{i['fid_vs_data'] - fids.mean():+.3f} |")
        print(f"| {name} | {lo:.1f} / {mean:.1f} | {f['fid_vs_data']:.3f} / {i['fid_vs_data']:.3f} "
              f"({i['fid_vs_data'] - f['fid_vs_data']:+.3f}) |{spread} {f['fid_vs_fp']:.3f} / {i['fid_vs_fp']:.3f} "
              f"| {f['psnr_vs_fp']:.2f} / {i['psnr_vs_fp']:.2f} |")
    print("\nper-sample divergence: each variant's samples against the fake model's\n")
    print("| run | samples | median PSNR (dB) | samples < 20 dB | samples > 40 dB |")
    print("|---|---|---|---|---|")
    for name, label, median, below, above, n in divergence_rows:
        print(f"| {name} | {label} | {median:.1f} | {below} / {n} | {above} / {n} |")


if __name__ == "__main__":
    main()
