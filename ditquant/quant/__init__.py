"""Fake-quantization primitives, quantized modules and the config that places them on a DiT."""
