"""Real integer inference for calibrated DiTs: int8 / packed int4 weights, int8 GEMMs (``torch._int_mm``, oneDNN's
quantized linear on x86), safetensors export. ``run_options`` switches how the integer layers run."""

from ditquant.integer.linear import IntLinear, RunOptions, run_options  # noqa: F401
