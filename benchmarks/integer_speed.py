"""Integer inference vs float on the DiT-XL/2 architecture (random weights, 256 px: 32×32×4 latents, 256 tokens).

    python benchmarks/integer_speed.py                      # batch 1, 8, 32 on this machine's CPU
    python benchmarks/integer_speed.py --batch 8 --profile  # plus where the integer forward spends its time

Prints, each measured in this run with the variants interleaved (A/B/A/B…, median of the repeats):
1. transformer forward time: fp32 eager, bf16 eager, integer W8A8 and W4A8 (static per-tensor asymmetric A8,
   asymmetric per-channel weights, every linear quantized as in PTQ4DiT; attention matmuls in float) and W8A8 with
   symmetric per-channel weights (no weight zero point), and the speedups of the integer models over fp32 and
   bf16. Each integer model runs several ways: as the integer layer
   ran before its run options existed (eager input quantization, int4 unpacked per call, ``torch._int_mm``: the
   A/B against the previous main), with today's defaults (fused input quantization, oneDNN's quantized linear on
   x86 with the GELU fused, int4 kept unpacked) and float parts in fp32, and with its float parts (attention, norms,
   embeddings, unquantized layers) in bf16 — on CPU also with ``torch._int_mm`` in place of oneDNN, and with exact
   float32 GEMMs on the int8 codes (the default on CPUs without int8 dot products, where ``--no-int-mm`` leaves out
   the rows that run ``torch._int_mm``, "before" among them: minutes per forward there);
2. per GEMM shape of a block at the largest batch: IntLinear (quantize + int GEMM + rescale) vs F.linear fp32, and
   with bf16 input and output vs F.linear bf16, next to the bare ``torch._int_mm`` and exact float32 GEMM (on int8
   codes) vs fp32 matmul ratios;
3. bytes: safetensors file of the fp32 model vs the integer W8 / W4 exports (whole model, and the quantized
   weights alone), and the peak memory of a process that loads each file and runs one forward (batch 1).
With ``--device cuda`` the float baselines are bf16 eager and bf16 + torch.compile.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ditquant.integer.convert import to_integer
from ditquant.export.integer import save_integer
from ditquant.integer.linear import IntLinear, float_exact_mm, int8_dot_products, run_options
from ditquant.models.dit import DiTConfig, build_dit
from ditquant.models.loading import DiTSource
from ditquant.models.adapters import quantize_model
from ditquant.quant.config import QuantConfig
from ditquant.quant.modules import observing_activations
from ditquant.quant.spec import QuantSpec

XL = DiTConfig.named("DiT-XL/2", input_size=32)
BEFORE = {"fused_quantization": False, "keep_unpacked": False, "onednn": False, "float_exact_gemm": False}
# the integer layer before its run options existed: eager input quantization, int4 unpacked per call, torch._int_mm


def configs() -> dict[str, QuantConfig]:
    act = QuantSpec(bits=8, symmetric=False, granularity="tensor")
    quants = {f"W{b}A8": QuantConfig(weight=QuantSpec(bits=b, symmetric=False, granularity="channel"), activation=act)
              for b in (8, 4)}
    # without a weight zero point: asymmetric 8-bit weights need a per-token correction the int8 GEMM cannot fuse
    quants["W8A8 symmetric weights"] = QuantConfig(weight=QuantSpec(bits=8, symmetric=True, granularity="channel"),
                                                   activation=act)
    return quants


def random_xl(config: DiTConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_dit(config).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def inputs(config: DiTConfig, batch: int, device: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    return x.to(device, dtype), t.to(device), y.to(device)


def integer_model(fp: torch.nn.Module, quant: QuantConfig, config: DiTConfig) -> torch.nn.Module:
    """Quantize a copy of ``fp`` (RTN weights, activation ranges from two batches) and convert it to integers."""
    fake = quantize_model(copy.deepcopy(fp), quant)
    with torch.no_grad(), observing_activations(fake):
        fake(*inputs(config, 2, "cpu"))
    return to_integer(fake)


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(variants: dict, repeats: int, sync) -> dict[str, float]:
    """Median seconds per variant, each repeat running every variant once (warm-up run first)."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, sync))
    return {name: statistics.median(ts) for name, ts in times.items()}


def forward_table(models: dict, config: DiTConfig, batches: list[int], repeats: int, device: str, sync) -> None:
    """``models``: name -> (model, input dtype, integer run options); every integer row against every float row."""
    floats = [n for n, (_, _, options) in models.items() if options is None]
    print("\n## transformer forward (median seconds; speedup = float time / integer time)\n")
    for batch in batches:
        variants = {}
        for name, (model, dtype, options) in models.items():
            args = inputs(config, batch, device, dtype)

            def call(m=model, a=args, o=options or {}):
                with run_options(**o):
                    m(*a)
            variants[name] = call
        with torch.no_grad():
            t = interleaved(variants, repeats, sync)
        print(f"batch {batch}:\n")
        print("| model | seconds | " + " | ".join(f"vs {f}" for f in floats) + " |")
        print("|---|---|" + "---|" * len(floats))
        for name in models:
            ratios = " | ".join("" if name in floats else f"{t[f] / t[name]:.2f}×" for f in floats)
            print(f"| {name} | {t[name]:.3f} | {ratios} |")
        print()


def gemm_table(model: torch.nn.Module, config: DiTConfig, batch: int, repeats: int) -> None:
    tokens = batch * (config.input_size // config.patch_size) ** 2
    block = model.transformer_blocks[0]
    layers = {"qkv (to_q)": block.attn1.to_q, "attn out": block.attn1.to_out[0],
              "fc1 + GELU": block.ff.net[0].proj, "fc2": block.ff.net[2]}
    print(f"\n## per GEMM, {tokens} tokens (batch {batch}); speedup over F.linear fp32\n")
    print("| layer | shape | IntLinear vs fp32 | IntLinear vs bf16 | bare _int_mm vs fp32 | bare float-exact GEMM vs fp32 |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        assert isinstance(layer, IntLinear)
        x = torch.randn(tokens, layer.in_features, generator=g)
        w = layer.dequantized_weight()
        xb, wb, bb = x.bfloat16(), w.bfloat16(), None if layer.bias is None else layer.bias.bfloat16()
        a8 = torch.randint(-128, 127, (tokens, layer.in_features), dtype=torch.int8, generator=g)
        w8 = layer.integer_weight()
        def linear(x, w, b, gelu=layer.gelu):  # the float layer, with the GELU the integer one runs (fc1)
            y = F.linear(x, w, b)
            return y if gelu is None else F.gelu(y, approximate=gelu)

        with torch.no_grad():
            t = interleaved({"fp32": lambda: linear(x, w, layer.bias), "int": lambda: layer(x),
                             "bf16": lambda: linear(xb, wb, bb), "int bf16": lambda: layer(xb),
                             "mm32": lambda: x @ w.t(), "mm8": lambda: torch._int_mm(a8, w8.t()),
                             "float exact": lambda: float_exact_mm(a8, w8.t())}, repeats, lambda: None)
        print(f"| {name} | {tokens}×{layer.in_features}×{layer.out_features} | {t['fp32'] / t['int']:.2f}× | "
              f"{t['bf16'] / t['int bf16']:.2f}× | {t['mm32'] / t['mm8']:.2f}× | {t['mm32'] / t['float exact']:.2f}× |")


def attention_table(config: DiTConfig, batch: int, repeats: int) -> None:
    """One layer's attention: fused bf16 SDPA against the two int8 GEMMs alone (QKᵀ and PV per sample and head with
    ``torch._int_mm``; no softmax, quantization or rescale counted), the integer form of quantized attention."""
    heads, tokens = config.num_heads, (config.input_size // config.patch_size) ** 2
    head_dim = config.hidden_size // heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g).bfloat16() for _ in range(3))
    codes = [torch.randint(-128, 127, (batch * heads, *shape), dtype=torch.int8, generator=g)
             for shape in ((tokens, head_dim), (head_dim, tokens), (tokens, tokens), (tokens, head_dim))]
    qc, kt, pc, vc = [c.contiguous() for c in codes]

    def int8_gemms():
        for i in range(batch * heads):
            torch._int_mm(qc[i], kt[i])
            torch._int_mm(pc[i], vc[i])

    with torch.no_grad():
        t = interleaved({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v), "int8": int8_gemms}, repeats,
                        lambda: None)
    print(f"\n## attention of one layer, batch {batch} ({batch * heads} sample-heads of {tokens}×{head_dim})\n")
    print("| bf16 SDPA (fused) | int8 QKᵀ + PV GEMMs alone, per sample-head `torch._int_mm` | ratio |")
    print("|---|---|---|")
    print(f"| {t['sdpa'] * 1e3:.1f} ms | {t['int8'] * 1e3:.1f} ms | {t['sdpa'] / t['int8']:.2f}× |")


_PEAK = """
import json, sys, torch
from safetensors.torch import load_file
from ditquant.models.dit import DiTConfig, build_dit
from ditquant.export.integer import assign_state, load_integer
from ditquant.integer.linear import run_options
kind, path, config = sys.argv[1], sys.argv[2], DiTConfig(**json.loads(sys.argv[3]))
options = json.loads(sys.argv[4])
import os
imported = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident after imports
if kind == "fp32":
    with torch.device("meta"):
        model = build_dit(config)
    assign_state(model, load_file(path))
elif kind == "integer":
    model = load_integer(path)
g = torch.Generator().manual_seed(0)
with torch.no_grad(), run_options(**options):
    model(torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]), torch.tensor([1]))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
print(hwm - imported)
"""


def peak_rss(kind: str, path: str, config: DiTConfig, options: dict | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", _PEAK, kind, path, json.dumps(config.to_dict()),
                          json.dumps(options or {})], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


def bytes_table(fp: torch.nn.Module, integers: dict[str, torch.nn.Module], quants: dict[str, QuantConfig],
                config: DiTConfig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fp_file = Path(tmp) / "fp32.safetensors"
        state = {k: v.contiguous() for k, v in fp.state_dict().items()}
        state.update({k: v.contiguous() for k, v in fp.named_buffers() if k not in state})
        save_file(state, str(fp_file))
        quantized_fp32 = sum(m.in_features * m.out_features * 4 for m in integers["W8A8"].modules()
                             if isinstance(m, IntLinear))
        rows = [("fp32", fp_file.stat().st_size, quantized_fp32, peak_rss("fp32", str(fp_file), config))]
        for name, model in integers.items():
            folder = Path(tmp) / name
            save_integer(model, folder, DiTSource(), quants[name])
            weights = sum(m.weight_bytes for m in model.modules() if isinstance(m, IntLinear))
            rows.append((name, (folder / "model.safetensors").stat().st_size, weights,
                         peak_rss("integer", str(folder), config)))
            if model.transformer_blocks[0].ff.net[2].packed:  # int4 held packed at run time: memory over speed
                rows.append((f"{name}, keep_unpacked off", rows[-1][1], weights,
                             peak_rss("integer", str(folder), config, {"keep_unpacked": False})))
    print("\n## bytes (peak memory: a process's peak resident set while it loads the file and runs one batch-1 "
          "forward, minus its resident set after importing torch)\n")
    print("| model | file | ratio | quantized weights | ratio | peak RSS | ratio |")
    print("|---|---|---|---|---|---|---|")
    f0, w0, p0 = rows[0][1], rows[0][2], rows[0][3]
    for name, file, weights, peak in rows:
        print(f"| {name} | {file / 2**20:.0f} MiB | 1/{f0 / file:.2f} | {weights / 2**20:.0f} MiB | "
              f"1/{w0 / weights:.2f} | {peak / 2**20:.0f} MiB | 1/{p0 / max(peak, 1):.2f} |")


def profile(models: dict[str, tuple[torch.nn.Module, torch.dtype]], config: DiTConfig, batch: int) -> None:
    """Top operators by self CPU time of each model's forward (name -> (model, input dtype))."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for name, (model, dtype) in models.items():
        args = inputs(config, batch, "cpu", dtype)
        with torch.no_grad():
            model(*args)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                model(*args)
        print(f"\n## {name} forward, batch {batch}: top operators by self CPU time\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--depth", type=int, default=XL.depth, help="fewer blocks for a quick run (XL: 28)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--attention", action="store_true", help="add the int8 attention GEMMs vs bf16 SDPA table")
    p.add_argument("--compiled", action="store_true", help="add W8A8 (bf16 float parts) with every transformer "
                   "block under torch.compile (which runs torch._int_mm, not oneDNN)")
    p.add_argument("--skip-bytes", action="store_true")
    p.add_argument("--no-int-mm", action="store_true", help="leave out the rows that run torch._int_mm on CPU "
                   "(\"before\" among them): minutes per forward on a CPU without int8 dot products (AVX2 only)")
    args = p.parse_args()
    config = DiTConfig(**{**XL.to_dict(), "depth": args.depth})
    print(f"DiT-XL/2 architecture, depth {config.depth}, 256 px (latent 32×32×4, 256 tokens), random weights; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; CPU "
          f"{torch.backends.cpu.get_cpu_capability()}, int8 dot products (VNNI / AMX): {int8_dot_products()}")
    fp = random_xl(config)
    quants = configs()
    integers = {name: integer_model(fp, q, config) for name, q in quants.items()}
    device = args.device
    if device == "cuda":
        sync = torch.cuda.synchronize
        bf16 = build_dit(config).to(device, torch.bfloat16).eval()
        bf16.load_state_dict(fp.state_dict())
        models = {"bf16": (bf16, torch.bfloat16, None),
                  "bf16 compiled": (torch.compile(bf16), torch.bfloat16, None)}
    else:
        sync = lambda: None  # noqa: E731
        bf16 = build_dit(config).to(torch.bfloat16).eval()
        bf16.load_state_dict(fp.state_dict())
        models = {"fp32": (fp, torch.float32, None), "bf16": (bf16, torch.bfloat16, None)}
    for name, m in integers.items():  # A/B: the layer as it ran before (eager quantization, int4 unpacked per call)
        if not args.no_int_mm:
            models[f"{name} before (fp32 float parts)"] = (m.to(device), torch.float32, BEFORE)
        models[f"{name} (fp32 float parts)"] = (m, torch.float32, {})
        bf16_parts = copy.deepcopy(m).to(torch.bfloat16)
        if device == "cpu":
            if not args.no_int_mm:
                models[f"{name} (bf16 float parts, torch._int_mm)"] = (bf16_parts, torch.bfloat16,
                                                                       {"onednn": False, "float_exact_gemm": False})
            models[f"{name} (bf16 float parts, float32 GEMMs)"] = (bf16_parts, torch.bfloat16,
                                                                   {"onednn": False, "float_exact_gemm": True})
        models[f"{name} (bf16 float parts)"] = (bf16_parts, torch.bfloat16, {})
        if args.compiled and name == "W8A8":
            compiled = copy.deepcopy(bf16_parts)
            for block in compiled.transformer_blocks:  # regional: one compiled graph serves every block
                block.compile()
            models[f"{name} (bf16 float parts, blocks compiled)"] = (compiled, torch.bfloat16, {})
    forward_table(models, config, args.batch, args.repeats, device, sync)
    if device == "cpu":
        gemm_table(integers["W8A8"], config, max(args.batch), args.repeats)
        if args.attention:
            attention_table(config, max(args.batch), max(args.repeats, 5))
        if not args.skip_bytes:
            bytes_table(fp, integers, quants, config)
        if args.profile:
            profile({"bf16": (bf16, torch.bfloat16), "integer W8A8, bf16 float parts": models["W8A8 (bf16 float parts)"][:2]}, config,
                    8 if 8 in args.batch else max(args.batch))


if __name__ == "__main__":
    main()
