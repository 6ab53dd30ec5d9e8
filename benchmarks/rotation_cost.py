"""What rotated inputs and an SVDQuant branch cost at DiT-XL/2's widths, measured in one run on this machine.

    python benchmarks/rotation_cost.py [--tokens 2048] [--repeats 20]

For each block linear of DiT-XL/2 (q/k/v, attention output, fc1: input 1152; fc2: input 4608) with ``tokens`` rows
(batch 8 at 256 px = 8 x 256 tokens): the time of the layer's FP32 GEMM, of the online rotation (``Rotation``: the
fast Walsh-Hadamard transform of H_2^k ⊗ H_36, eager PyTorch), and of a rank-32 branch L·(R·x); printed as ratios to
the GEMM. The attention output's rotation is folded into V's rows (free), so it is listed but not charged.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ditquant.quant.pieces import Rotation

LAYERS = [("q/k/v (each)", 1152, 1152, "online"), ("attention output", 1152, 1152, "folded into V"),
          ("fc1", 1152, 4608, "online"), ("fc2", 4608, 1152, "online")]


def timed(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    rotation = Rotation.of("hadamard")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, fp32")
    print("| layer | in -> out | GEMM ms | rotation | rotation / GEMM | rank-32 branch / GEMM |")
    print("|---|---|---|---|---|---|")
    for name, fan_in, fan_out, where in LAYERS:
        x = torch.randn(args.tokens, fan_in)
        w = torch.randn(fan_out, fan_in)
        left, right = torch.randn(fan_out, args.rank), torch.randn(args.rank, fan_in)
        gemm = timed(lambda: F.linear(x, w), args.repeats)
        rot = timed(lambda: rotation(x), args.repeats) if where == "online" else 0.0
        branch = timed(lambda: F.linear(F.linear(x, right), left), args.repeats)
        print(f"| {name} | {fan_in} -> {fan_out} | {gemm * 1e3:.2f} | {where} | {rot / gemm:.2f} | "
              f"{branch / gemm:.2f} |")


if __name__ == "__main__":
    main()
