"""ditquant: post-training quantization of Diffusion Transformers (PTQ4DiT, Q-DiT, DiTAS).

The Python API (see ``ditquant.api`` and README, "Python"): ``load``, ``calibration_set``, ``quantize``,
``balance`` / ``smooth`` / ``low_rank`` / ``gptq`` / ``search_group_sizes`` (the methods' steps; the methods
themselves are registered ``Method`` dataclasses, see ``ditquant.methods``), ``calibrate``, ``reconstruct``,
``generate`` (seeded samples), ``save_quantized`` / ``load_quantized``, ``to_integer`` / ``save_integer`` /
``load_integer``, and the configs and building blocks they take.
"""

__version__ = "0.1.0"

from ditquant.api import (balance, calibrate, calibration_set, generate, gptq, load, load_pixart,  # noqa: E402
                          low_rank, quantize, reconstruct, sample_set_fid, search_group_sizes, smooth)
from ditquant.calibration.dataset import (CalibrationRecipe, CalibrationSet, collate_pairs,  # noqa: E402
                                          record_calibration_set)
from ditquant.diffusion.samplers import SamplerConfig, sample  # noqa: E402
from ditquant.errors import Interrupted, UserError  # noqa: E402
from ditquant.evaluation.sampling import EvaluationConfig, seeded_noise, step_generators, to_uint8  # noqa: E402
from ditquant.methods import (GPTQ, METHODS, GranularitySearch, InputRotation, LowRankCompensation,  # noqa: E402
                              Method, MethodContext, MixedPrecision, SalienceBalancing, SVDQuantBranch,
                              TemporalSmoothing, check_order, register, run_methods)
from ditquant.integer.agreement import block_sqnr, sqnr_db  # noqa: E402
from ditquant.integer.convert import to_integer  # noqa: E402
from ditquant.export.integer import load_integer, save_integer  # noqa: E402
from ditquant.export.diffusers_format import DitQuantConfig, save_diffusers  # noqa: E402  (registers the backend)
from ditquant.models.adapters import Adapter, DiTAdapter, PixArtAdapter, RescalableInput, adapter_for  # noqa: E402
from ditquant.models.pixart import LoadedPixArt, PixArtSource, PromptTable, encode_prompts  # noqa: E402
from ditquant.models.loading import DiTSource, LoadedDiT, load_dit  # noqa: E402
from ditquant.models.adapters import quantize_model  # noqa: E402
from ditquant.quant.apply import quantization_table  # noqa: E402
from ditquant.export.calibrated import load_quantized, save_quantized  # noqa: E402
from ditquant.quant.config import LayerOverride, QuantConfig  # noqa: E402
from ditquant.quant.modules import QuantLayer, observing_activations, quant_disabled  # noqa: E402
from ditquant.quant.spec import QuantSpec  # noqa: E402
from ditquant.reconstruction.config import ReconstructionConfig  # noqa: E402
from ditquant.reconstruction.reconstructor import BlockReconstructor  # noqa: E402

__all__ = ["balance", "calibrate", "calibration_set", "generate", "gptq", "load", "low_rank", "quantize",
           "reconstruct", "sample_set_fid", "search_group_sizes", "smooth", "SVDQuantBranch", "GPTQ", "METHODS",
           "GranularitySearch", "InputRotation", "LowRankCompensation", "Method", "MethodCallback", "MethodContext",
           "MixedPrecision",
           "SalienceBalancing", "TemporalSmoothing", "check_order", "register", "run_methods", "Adapter",
           "DiTAdapter", "RescalableInput", "adapter_for", "sample", "CalibrationRecipe", "CalibrationSet",
           "collate_pairs", "record_calibration_set", "SamplerConfig", "Interrupted", "UserError",
           "EvaluationConfig", "seeded_noise", "step_generators", "to_uint8", "block_sqnr", "sqnr_db", "to_integer",
           "load_integer", "save_integer", "DitQuantConfig", "save_diffusers", "DiTSource", "LoadedDiT", "load_dit", "quantization_table",
           "PixArtAdapter", "LoadedPixArt", "PixArtSource", "PromptTable", "encode_prompts", "load_pixart",
           "quantize_model", "load_quantized", "save_quantized", "LayerOverride", "QuantConfig", "QuantLayer",
           "observing_activations", "quant_disabled", "QuantSpec", "ReconstructionConfig", "BlockReconstructor"]


def __getattr__(name: str):
    # The Lightning callback that runs a method in `ditquant fit` (`class_path: ditquant.MethodCallback`), imported
    # on first use so that `import ditquant` does not import Lightning.
    if name == "MethodCallback":
        from ditquant.callbacks import MethodCallback

        return MethodCallback
    raise AttributeError(f"module 'ditquant' has no attribute {name!r}")
