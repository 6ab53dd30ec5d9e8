"""Real integer inference for calibrated DiTs: int8 / packed int4 weights, ``torch._int_mm`` GEMMs, safetensors export."""
