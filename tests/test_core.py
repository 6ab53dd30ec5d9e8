"""The core's seams: the family adapter is the only way to the model, layers import one way, and a run loads its
model once, recording the calibration set with that same model unwrapped."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import ditquant as dq
from ditquant.models.bundled import DIT_DIR
from ditquant.quant.apply import unwrapped
from tests.cli_helpers import run
from tests.config_runs import SMALL
from tests.tiny_models import random_dit

PACKAGE = Path(dq.__file__).parent


def test_the_dit_adapter_calls_the_model_as_diffusers_does():
    model = random_dit()
    adapter = dq.adapter_for(model)
    assert isinstance(adapter, dq.DiTAdapter)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 9])
    assert torch.equal(adapter.forward(model, x, t, y), model(x, t, y).sample)
    assert adapter.null_condition(model, y).tolist() == [10, 10]  # the label table's extra row
    roles = adapter.role_map(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert set(roles.layers) <= set(linears) and set(roles.layers.values()) == set(roles.roles)
    assert [name for name, _ in adapter.units(model)] == ["pos_embed.proj", "transformer_blocks.0",
                                                         "transformer_blocks.1", "proj_out_1", "proj_out_2"]
    points = adapter.rescalable_inputs(model)
    assert [(p.name, p.fold) for p in points[:4]] == [("attention", "modulation"), ("attn_out", "value"),
                                                     ("mlp", "modulation"), ("fc2", "online")]


def test_a_model_no_adapter_knows_is_a_clear_error():
    with pytest.raises(ValueError, match="no model-family adapter knows this model"):
        dq.adapter_for(torch.nn.Linear(2, 2))


def test_quant_roles_unknown_to_the_family_are_refused_at_quantize_time():
    with pytest.raises(ValueError, match=r"quant.roles: unknown layer role\(s\) \['nope'\]; this model's roles: "):
        dq.quantize(random_dit(), dq.QuantConfig(roles=["qkv", "nope"]))


def test_unwrapped_is_the_loaded_model_and_restores_the_quantized_one():
    model = random_dit()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 9])
    fp_keys, fp_out = list(model.state_dict()), model(x, t, y).sample
    dq.quantize(model, dq.QuantConfig(attention=dq.QuantSpec(bits=8)))
    dq.calibrate(model, dq.CalibrationSet({"xs": x[None], "ts": t[:1], "ys": y}, null_label=10, guidance=False))
    quantized_keys, quantized_out = list(model.state_dict()), model(x, t, y).sample
    with unwrapped(model):
        assert list(model.state_dict()) == fp_keys
        assert torch.equal(model(x, t, y).sample, fp_out)  # bit for bit: diffusers' own attention, plain linears
    assert list(model.state_dict()) == quantized_keys
    assert torch.equal(model(x, t, y).sample, quantized_out)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("package, forbidden", [
    ("quant", ("ditquant.models", "ditquant.methods", "ditquant.evaluation", "ditquant.reconstruction", "lightning")),
    ("models", ("ditquant.methods", "ditquant.evaluation", "ditquant.reconstruction", "lightning")),
    ("methods", ("ditquant.evaluation", "ditquant.reconstruction", "ditquant.task", "lightning")),
    ("reconstruction", ("ditquant.methods", "ditquant.evaluation", "ditquant.task", "lightning")),
    ("calibration", ("ditquant.methods", "ditquant.evaluation", "ditquant.task", "lightning")),
])
def test_layers_import_one_way(package, forbidden):
    """primitives and quantized layers <- adapters <- methods / reconstruction <- Lightning <- CLI (the bundled
    model's training scripts are programs, not library layers)."""
    for path in sorted((PACKAGE / package).rglob("*.py")):
        if path.name.startswith("train_"):
            continue
        bad = sorted(m for m in _imports(path) if m.startswith(forbidden))
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


@pytest.mark.skipif(not (DIT_DIR / "config.json").is_file(), reason="bundled model not trained")
def test_fit_loads_the_model_once(tmp_path, monkeypatch):
    import ditquant.task

    calls = []
    load = ditquant.task.load_dit
    monkeypatch.setattr("sys.argv", ["ditquant"])
    monkeypatch.setattr(ditquant.task, "load_dit", lambda source: calls.append(source) or load(source))
    run("fit", "--config", "configs/ptq4dit_w8a8.yaml", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--data.cache_dir", str(tmp_path / "calib"), "--model.reconstruction.iterations", "2", *SMALL)
    assert len(calls) == 1 and any((tmp_path / "calib").iterdir())  # recorded with the run's model


def test_layer_pieces_own_their_state_and_load_from_saved_states_of_any_age():
    """A layer with a divisor and a low-rank branch saves them as its pieces' state; a fresh layer loads that state,
    and the names ditquant 0.1 saved them under (input_divisor, lora_left, lora_right), fake and integer alike."""
    from ditquant.integer.convert import to_integer_layer
    from ditquant.integer.linear import IntLinear

    def layer(seed: int):
        torch.manual_seed(seed)
        model = dq.quantize(random_dit(depth=1, seed=seed), dq.QuantConfig(roles=["fc2"]))
        return model.transformer_blocks[0].ff.net[2]

    q = layer(0)
    q.divide_input(torch.rand(q.layer.in_features) + 0.5)
    q.compensate_low_rank(rank=2, iterations=2)
    with torch.no_grad(), dq.observing_activations(q):
        q(torch.randn(4, 3, q.layer.in_features))
    state = q.state_dict()
    assert {"input_transforms.0.divisor", "branches.0.left", "branches.0.right"} <= set(state)
    legacy = {{"input_transforms.0.divisor": "input_divisor", "branches.0.left": "lora_left",
               "branches.0.right": "lora_right"}.get(k, k): v for k, v in state.items()}
    x = torch.randn(2, 5, q.layer.in_features)
    for saved in (state, legacy):
        fresh = layer(1)
        fresh.load_state_dict(dict(saved))
        assert torch.equal(fresh(x), q(x))
    integer = to_integer_layer(q)
    int_state = {{"input_transforms.0.divisor": "input_divisor", "branches.0.left": "lora_left",
                  "branches.0.right": "lora_right"}.get(k, k): v for k, v in integer.state_dict().items()}
    shell = IntLinear(integer.out_features, integer.in_features, integer.weight_spec, integer.input_spec)
    shell.load_state_dict(int_state)
    assert torch.equal(shell(x), integer(x))


def test_per_layer_overrides_and_the_saved_plan(tmp_path):
    """Overrides name layers as well as roles; group sizes are per-layer overrides of the same plan; a saved model
    is checked against the plan it resolved to, however the config that made it was written."""
    from ditquant.quant.plan import model_plan

    spec8 = dq.QuantSpec(bits=8, symmetric=False, granularity="channel")
    config = dq.QuantConfig(weight=dq.QuantSpec(bits=4, granularity="group", group_size=16),
                            roles=["qkv", "attn_out", "fc1", "fc2"],
                            overrides=[dq.LayerOverride(layers=["transformer_blocks.1.ff.*"], weight=spec8)],
                            layer_group_sizes={"transformer_blocks.0.attn1.to_q": 8})
    model = dq.quantize(random_dit(), config)
    plan = model_plan(model)
    assert plan["transformer_blocks.1.ff.net.2"].weight == spec8 and plan["transformer_blocks.1.ff.net.2"].role == "fc2"
    assert plan["transformer_blocks.0.attn1.to_q"].weight.group_size == 8
    assert plan["transformer_blocks.0.attn1.to_k"].weight.group_size == 16
    with pytest.raises(ValueError, match=r"quant.overrides\[0\].layers: 'blocks.9.\*' matches no quantized layer"):
        dq.quantize(random_dit(), dq.QuantConfig(overrides=[dq.LayerOverride(layers=["blocks.9.*"])]))

    source = dq.DiTSource(source="tiny")
    rtn = dq.quantize(random_dit(), dq.QuantConfig())
    dq.calibrate(rtn, dq.CalibrationSet({"xs": torch.randn(1, 2, 4, 8, 8), "ts": torch.tensor([500]),
                                         "ys": torch.tensor([1, 2])}, null_label=10, guidance=False))
    dq.save_quantized(rtn, tmp_path / "q", source, dq.QuantConfig())
    every_role = dq.QuantConfig(roles=list(dq.adapter_for(rtn).role_map(rtn).roles))  # the same layers, spelled out
    dq.load_quantized(dq.quantize(random_dit(seed=1), every_role), tmp_path / "q", source, every_role)
    with pytest.raises(ValueError, match=r"different quant: model.quant.plan.pos_embed.proj.weight.bits is 8 there"):
        four = dq.QuantConfig(weight=dq.QuantSpec(bits=4, granularity="channel"))
        dq.load_quantized(dq.quantize(random_dit(seed=1), four), tmp_path / "q", source, four)

    # a file written before a spec field existed (timestep_groups) loads: the field takes its default
    from ditquant.export.calibrated import META, WEIGHTS
    from ditquant.io import committed_folder

    meta = tmp_path / "q" / META
    meta.write_text("".join(line for line in meta.read_text().splitlines(True) if "timestep_groups" not in line))
    with committed_folder(tmp_path / "q", (WEIGHTS, META)):
        pass
    dq.load_quantized(dq.quantize(random_dit(seed=1), every_role), tmp_path / "q", source, every_role)
