"""Artifacts: a calibrated (fake-quantized) model and its integer twin on disk, behind one header check.

- ``calibrated``: ``quantized/`` written by ``ditquant fit`` (the quantized model's state, the model source, the
  QuantConfig and the per-layer plan); loaded into a model quantized the same way.
- ``integer``: ``ditquant export``'s folder (integer layers only, loadable without the FP weights).
- ``command``: the ``ditquant export`` command.

Both describe what they were made with in a YAML header and refuse, naming the differing option, to load into a
command configured otherwise (``ditquant.io.check_same``); both are committed by a checksummed manifest.
"""

from ditquant.export.calibrated import load_quantized, save_quantized, saved_searched_layout
from ditquant.export.integer import load_integer, read_integer_meta, save_integer

__all__ = ["load_integer", "load_quantized", "read_integer_meta", "save_integer", "save_quantized",
           "saved_searched_layout"]
