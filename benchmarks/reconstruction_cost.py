"""What block reconstruction costs, measured in one run (ratios, not absolute times: machines are noisy).

    python benchmarks/reconstruction_cost.py overhead   [--model bundled|xl] [--batch 32] [--repeats 10]
    python benchmarks/reconstruction_cost.py xl-memory  [--rows 16] [--iterations 3]
    python benchmarks/reconstruction_cost.py bundled-fit [--config configs/qdiff_w4a8.yaml]

- ``overhead``: one reconstruction step of a transformer block (fake-quantized W4A8 with attention operands,
  AdaRound soft weights, regulariser, Adam) divided by a plain FP forward+backward+Adam step of the same block on
  the same batch. A/B interleaved, medians. Target: <= 3x.
- ``xl-memory``: peak memory of reconstructing block 0 of a DiT-XL/2-config model at 256 px (random weights;
  CUDA: max allocated; CPU: peak RSS of this process, which includes the 2.7 GB FP32 model).
- ``bundled-fit``: wall time and peak RSS of ``ditquant fit`` on the bundled model (a child process).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch

from ditquant.calibration.dataset import CalibrationSet
from ditquant.models.bundled.train_dit import BUNDLED_CONFIG
from ditquant.models.dit import DiTConfig, build_dit
from ditquant.models.adapters import quantize_model
from ditquant.quant.config import QuantConfig
from ditquant.quant.modules import observing_activations
from ditquant.quant.spec import QuantSpec
from ditquant.reconstruction.config import ReconstructionConfig
from ditquant.reconstruction.reconstructor import BlockReconstructor

W4A8 = QuantConfig(weight=QuantSpec(bits=4, granularity="channel"), attention=QuantSpec(bits=8))
CONFIGS = {"bundled": BUNDLED_CONFIG, "xl": DiTConfig.named("DiT-XL/2", 32)}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_calibration(config: DiTConfig, rows: int) -> CalibrationSet:
    g = torch.Generator().manual_seed(0)
    steps = max(1, rows // 8)
    data = {"xs": torch.randn(steps, 4, config.in_channels, config.input_size, config.input_size, generator=g),
            "ts": torch.linspace(0, 999, steps).long(), "ys": torch.arange(4) % config.num_classes}
    return CalibrationSet(data, null_label=config.num_classes, guidance=True)


def prepared(config: DiTConfig, rows: int, recon: ReconstructionConfig):
    torch.manual_seed(0)
    model = build_dit(config).to(device()).eval()
    quantize_model(model, W4A8)
    cal = random_calibration(config, rows)
    with torch.no_grad(), observing_activations(model):
        for i in range(len(cal)):
            model(*(cal[i][k].to(device()) for k in ("x", "t", "y")))
    return model, BlockReconstructor(model, recon, cal)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def overhead(args) -> None:
    config = CONFIGS[args.model]
    model, rec = prepared(config, rows=max(args.batch, 16), recon=ReconstructionConfig(
        iterations=10_000, batch_size=args.batch))
    while rec.locate(rec.step)[0] < 1:  # move to block 0 (stage 1), warming up
        rec.run_step()
    rec.run_step()
    active = rec._active
    rows = active.cache.batch(torch.arange(args.batch), device())
    block = build_dit(config).transformer_blocks[0].to(device())  # an FP block of the same shape
    block.train(False)
    fp_opt = torch.optim.Adam(block.parameters(), lr=1e-4)
    args_, kwargs = active.signature.bind(rows)

    def fp_step():
        out = block(*args_, **kwargs)
        loss = (out - rows["target"]).square().sum(1).mean()
        fp_opt.zero_grad()
        loss.backward()
        fp_opt.step()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    fp_step()
    fp_times, rec_times = [], []
    for _ in range(args.repeats):  # A/B interleaved
        fp_times.append(timed(fp_step))
        rec_times.append(timed(rec.run_step))
    fp, rq = statistics.median(fp_times), statistics.median(rec_times)
    print(f"{args.model} block, batch {args.batch} rows, {device()}: FP fwd+bwd+Adam {fp * 1e3:.1f} ms, "
          f"reconstruction step {rq * 1e3:.1f} ms -> overhead {rq / fp:.2f}x (target <= 3x)")


def xl_memory(args) -> None:
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model, rec = prepared(CONFIGS["xl"], rows=args.rows,
                          recon=ReconstructionConfig(iterations=args.iterations, batch_size=min(32, args.rows)))
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    while rec.locate(rec.step)[0] < 2:  # patch embedding, then block 0
        rec.run_step()
    seconds = time.perf_counter() - start
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"DiT-XL/2 256px block 0, {args.rows} rows: peak CUDA memory {peak:.2f} GiB "
              f"(model {model_gb:.2f} GiB), {seconds:.1f} s")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"DiT-XL/2 256px block 0, {args.rows} rows, {args.iterations} iterations on CPU: peak RSS "
              f"{peak:.2f} GiB (at start {start_rss:.2f} GiB; FP32 model {model_gb:.2f} GiB), {seconds:.1f} s")


def bundled_fit(args) -> None:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ditquant", "fit", "--config", args.config,
                    "--trainer.default_root_dir", "runs/bench_fit", "--trainer.enable_progress_bar", "false"],
                   check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"ditquant fit --config {args.config} (bundled model): {seconds:.0f} s wall, peak RSS {peak:.2f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--model", choices=CONFIGS, default="bundled")
    o.add_argument("--batch", type=int, default=32)
    o.add_argument("--repeats", type=int, default=10)
    m = sub.add_parser("xl-memory")
    m.add_argument("--rows", type=int, default=16)
    m.add_argument("--iterations", type=int, default=3)
    f = sub.add_parser("bundled-fit")
    f.add_argument("--config", default="configs/qdiff_w4a8.yaml")
    args = p.parse_args()
    {"overhead": overhead, "xl-memory": xl_memory, "bundled-fit": bundled_fit}[args.what](args)


if __name__ == "__main__":
    main()
