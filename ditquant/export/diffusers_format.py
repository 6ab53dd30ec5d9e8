"""ditquant as a diffusers quantization backend (``quant_method: "ditquant"``): an integer model saved in diffusers'
own layout loads with ``DiTTransformer2DModel.from_pretrained`` (or inside ``DiTPipeline.from_pretrained``; PixArt:
``PixArtTransformer2DModel`` / ``PixArtAlphaPipeline``) into integer layers, without the FP weights, and
``save_pretrained`` writes it back.

Importing ``ditquant`` registers the backend in diffusers' quantizer tables, so in a fresh process::

    import ditquant  # noqa: F401  (registers quant_method "ditquant")
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel.from_pretrained("runs/ptq4dit_w4a8/diffusers")

The folder is diffusers' (``config.json`` with a ``quantization_config``, ``diffusion_pytorch_model.safetensors``);
the quantization config carries what ``load_integer``'s ``integer.yaml`` carries: the QuantConfig (with any searched
per-layer layout), the architecture, the per-layer layout and the layers kept in floating point
(``modules_to_not_convert``). Loading builds the integer layers on the meta device from that config, checks the
checkpoint holds exactly their tensors (names and shapes: a file made for another architecture or quant config is a
clear error), and assigns the stored integer tensors, scales and pieces as stored (never cast to ``torch_dtype``:
only the floating-point rest of the model is). Weights are read from safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import diffusers
import torch
from diffusers.quantizers import auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from safetensors import safe_open
from torch import nn

from ditquant import interrupt
from ditquant.errors import UserError
from ditquant.export.integer import FORMAT, integer_layout, integer_skeleton
from ditquant.integer.linear import IntLinear
from ditquant.models.adapters import adapter_for, adapter_named
from ditquant.quant.config import QuantConfig, quant_config_from_dict
from ditquant.quant.modules import QuantLayer


class DitQuantMethod(str, enum.Enum):
    """diffusers reads ``quant_method.value``; a str Enum also compares and serialises as the plain string."""

    DITQUANT = "ditquant"


class DitQuantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a ditquant integer model in diffusers' layout.

    Args:
        quant: the QuantConfig as ``dataclasses.asdict`` writes it (with the searched per-layer layout).
        architecture: the architecture it was calibrated on, as its family's adapter describes it (DiT: the
            ``DiTConfig``; PixArt: the transformer's diffusers config).
        layers: the integer layers' layout (name -> in/out features, weight/activation spec, storage).
        original_numerics: the model runs with the original DiT numerics (``use_original_numerics``), as calibrated.
        modules_to_not_convert: quantized layers exported in floating point (``ditquant export --keep-float``).
        format: the layout version of the integer layers.
        family: the model family (``dit``, ``pixart``).
    """

    def __init__(self, quant: dict, architecture: dict, layers: dict, original_numerics: bool = True,
                 modules_to_not_convert: Optional[list[str]] = None, format: str = FORMAT, family: str = "dit",
                 **kwargs):
        self.quant_method = DitQuantMethod.DITQUANT
        self.quant, self.architecture, self.layers, self.family = quant, architecture, layers, family
        self.original_numerics = original_numerics
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.format = format
        if format != FORMAT:
            raise UserError(f"quantization_config.format: {format!r} is not a layout this ditquant reads ({FORMAT!r})")

    def to_dict(self) -> dict[str, Any]:
        d = copy.deepcopy(self.__dict__)
        d["quant_method"] = self.quant_method.value
        return d

    def to_json_string(self, use_diff: bool = True) -> str:  # the mixin's default needs a to_diff_dict it lacks
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @property
    def quant_config(self) -> QuantConfig:
        return quant_config_from_dict(self.quant)


def _owner(key: str, modules) -> str | None:
    """The shortest module name among ``modules`` (a set or dict of names) that ``key`` lies under, if any."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        if (prefix := ".".join(parts[:i])) in modules:
            return prefix
    return None


class DitQuantizer(DiffusersQuantizer):
    """Loads a ditquant integer model: ``preprocess_model`` turns the empty (meta) model into the integer skeleton,
    every tensor of a ditquant module is then assigned exactly as stored (``create_quantized_param``)."""

    requires_calibration = True  # a model is quantized by `ditquant fit`; loading only reads the result

    def __init__(self, quantization_config: DitQuantConfig, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise UserError("quant_method 'ditquant' loads models calibrated by `ditquant fit` and exported with "
                            "`ditquant export --format diffusers`; it cannot quantize an FP model while loading")
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert = list(quantization_config.modules_to_not_convert)
        self.checkpoint_files: list[str] = []
        self.exact_keys: set[str] = set()

    def update_torch_dtype(self, torch_dtype: Optional[torch.dtype]) -> torch.dtype:
        return torch_dtype or torch.float32

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        self.checkpoint_files = [str(f) for f in checkpoint_files]
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        config: DitQuantConfig = self.quantization_config
        if not self.checkpoint_files:
            raise UserError(f"diffusers {diffusers.__version__} does not pass the checkpoint files to its quantizers "
                            "(maybe_update_loaded_keys); loading a ditquant model needs a newer diffusers")
        where = Path(self.checkpoint_files[0]).parent
        adapter = adapter_named(config.family)
        if not adapter.matches(model):
            raise UserError(f"{where}: its quantization_config is for a {config.family} model, but config.json "
                            f"builds a {type(model).__name__}")
        adapter.prepare_pretrained(model, config.architecture, str(where), original_numerics=config.original_numerics)
        stored_float = sorted(set(self.modules_to_not_convert) & set(config.layers))
        if stored_float:
            raise UserError(f"{where}: {stored_float} are stored as integer layers; modules_to_not_convert can only "
                            "name layers exported in floating point (ditquant export --keep-float)")
        integer_skeleton(model, config.quant_config, keep_float=self.modules_to_not_convert)
        stored = _stored_shapes(self.checkpoint_files)
        layers = {name: m for name, m in model.named_modules() if isinstance(m, IntLinear)}
        per_layer: dict[str, dict] = {name: {} for name in layers}
        for key, (shape, dtype) in stored.items():
            if (owner := _owner(key, layers)) is not None:
                per_layer[owner][key] = torch.empty(shape, dtype=dtype, device="meta")
        for name, layer in layers.items():
            layer.prepare_for_state(per_layer[name], name + ".")
        if integer_layout(model) != config.layers:
            raise UserError(f"{where}: the integer layers its quantization_config describes do not match the model "
                            "it builds (made by another ditquant version or edited by hand)")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if expected.keys() != stored.keys() or any(expected[k] != stored[k][0] for k in expected):
            missing, extra = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
            shapes = [k for k in expected.keys() & stored.keys() if expected[k] != stored[k][0]]
            raise UserError(f"{where}: the weights were not made for this architecture and quant config (missing "
                            f"{missing[:3]}, unexpected {extra[:3]}, other shapes {sorted(shapes)[:3]})")
        owners = {name for name, m in model.named_modules() if isinstance(m, (IntLinear, QuantLayer))}
        self.exact_keys = {k for k in expected if _owner(k, owners) is not None}
        return model

    def check_if_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                                 state_dict: dict[str, Any], **kwargs) -> bool:
        return param_name in self.exact_keys

    def create_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                               target_device, state_dict: dict[str, Any], unexpected_keys=None, **kwargs) -> None:
        value = state_dict[param_name].to(target_device)  # as stored: loading casts only the float model's own
        owner_name, _, leaf = param_name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise UserError(f"the checkpoint holds no tensors for {left[:5]}")
        return model.eval().requires_grad_(False)

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _stored_shapes(files: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor's (shape, dtype) in safetensors ``files``, from their headers (no tensor is read)."""
    shapes = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise UserError(f"{file}: a ditquant model loads from safetensors only (nothing is unpickled)")
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                shapes[key] = (tuple(s.get_shape()), _DTYPES[s.get_dtype()])
    return shapes


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def register() -> None:
    """Make diffusers' ``from_pretrained`` know ``quant_method: "ditquant"`` (idempotent)."""
    auto.AUTO_QUANTIZER_MAPPING[DitQuantMethod.DITQUANT.value] = DitQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[DitQuantMethod.DITQUANT.value] = DitQuantConfig


def save_diffusers(integer: nn.Module, folder: str | Path, source, quant: QuantConfig,
                   keep_float: tuple[str, ...] = (), pipeline: Optional[Path] = None) -> Path:
    """Write ``integer`` (``to_integer``'s output) in diffusers' layout: a model folder, or, with ``pipeline`` (the
    source pipeline folder), that pipeline with its ``transformer/`` replaced. The folder appears whole or not at all."""
    adapter = adapter_for(integer)
    config = DitQuantConfig(quant=dataclasses.asdict(quant), architecture=adapter.architecture(integer),
                            layers=integer_layout(integer),
                            original_numerics=bool(getattr(source, "original_numerics", True)),
                            modules_to_not_convert=list(keep_float), family=adapter.family)
    integer.register_to_config(quantization_config=config)
    integer.hf_quantizer = DitQuantizer(config)  # what from_pretrained attaches: save_pretrained checks it
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")  # written whole, then renamed into place
    shutil.rmtree(partial, ignore_errors=True)
    if pipeline is not None:  # the other components as they are; the quantized transformer in place of the FP one
        shutil.copytree(pipeline, partial, ignore=shutil.ignore_patterns("transformer"))
    integer.save_pretrained(partial / "transformer" if pipeline is not None else partial, safe_serialization=True)
    interrupt.check()  # a stop while writing leaves only the .partial folder
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder


register()
