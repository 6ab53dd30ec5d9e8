"""Lightning callbacks that carry a method's pre-processing of the FP model, run once at the start of ``fit``.

A pre-processing step (PTQ4DiT's salience balancing, DiTAS's smoothing) rewrites the DiT's weights so that the FP
function is unchanged but the quantizers see friendlier ranges. It must run after the model is wrapped in
QuantLayers (the folds re-initialise the weight quantizers) and before activation ranges are observed, so it runs
at the first training batch, ahead of the LightningModule's step: its cost counts in the fit time, and its result
(the folded weights) travels in the model's state. The callback's own state records that it ran, so a resumed fit
does not apply it twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import yaml
from torch import nn
from torch.utils.data import Dataset

from ditquant.checkpointing import save_last
from ditquant.diffusion.samplers import SamplerConfig
from ditquant.errors import UserError
from ditquant.evaluation.sample_fid import SampleSetFID
from ditquant.io import atomic_write
from ditquant.methods.balancing import balance_model
from ditquant.methods.gptq import check_options, quantize_model_gptq
from ditquant.methods.granularity import (SEARCH_SPACE, EvolutionarySearch, EvolutionSettings, cost,
                                          layer_group_sizes, search_genes)
from ditquant.methods.low_rank import compensate_low_rank
from ditquant.methods.smoothing import ALPHA_GRID, check_alphas, smooth_model
from ditquant.models.layout import BLOCK_LINEAR_ROLES, ROLES
from ditquant.quant.apply import apply_group_sizes
from ditquant.quant.modules import quant_disabled, quant_layers

log = logging.getLogger(__name__)


class Preprocessing(L.Callback):
    """Run ``apply`` once on the FP model (quantizers bypassed) before calibration; keep its report."""

    name = "preprocessing"

    def __init__(self):
        self.done = False
        self.report: dict = {}
        self._restored = False  # this callback's state came from the checkpoint being resumed

    def apply(self, model: nn.Module, calibration: Dataset) -> dict:
        raise NotImplementedError

    def check(self, pl_module: L.LightningModule) -> None:
        """Refuse bad options for this model before any work (``ditquant fit`` calls it before recording the
        calibration set); the quantized model is built."""

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """The step itself; by default ``apply`` on the FP model (every quantizer bypassed)."""
        with quant_disabled(pl_module.transformer):
            return self.apply(pl_module.transformer, trainer.datamodule.calibration)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done:
            return
        if trainer.ckpt_path is not None and not self._restored:
            raise UserError(f"{type(self).__name__}: the checkpoint being resumed ({trainer.ckpt_path}) was made "
                            "without it; start a new fit to apply it")
        self.check(pl_module)
        started = time.perf_counter()
        self.report = self.run(trainer, pl_module)
        self.report["seconds"] = self.report.get("seconds", 0.0) + time.perf_counter() - started
        self.done = True
        log.info("%s done in %.1f s", self.name, self.report["seconds"])

    def state_dict(self) -> dict:
        return {"done": self.done, "report": self.report}

    def load_state_dict(self, state_dict: dict) -> None:
        self.done, self.report = state_dict["done"], state_dict["report"]
        self._restored = True


class SalienceBalancing(Preprocessing):
    """PTQ4DiT's channel-wise salience balancing (CSB), folded into the weights (no online division).

    For q/k/v (one factor, shared input), the attention output projection and fc1 of every block, the activation
    is divided by f_j = √(s(X_j)/s(W_j)) and the weight columns multiplied by it; the division is folded into the
    adaLN modulation (q/k/v, fc1) and the V projection's rows (attention output). Statistics come from FP forwards
    over the whole calibration set.

    Args:
        salience: ``ssc``: s(X) = Σ_t softmax(−ρ)_t s(X^(t)) with ρ_t the Spearman correlation of activation and
            weight salience at calibration timestep t (PTQ4DiT); ``mid``: s(X) of the middle calibration timestep
            (the paper's "CSB only" ablation).
        batch_size: calibration rows per statistics forward.
    """

    name = "salience_balancing"

    def __init__(self, salience: Literal["ssc", "mid"] = "ssc", batch_size: int = 32):
        super().__init__()
        if salience not in ("ssc", "mid"):
            raise UserError(f"SalienceBalancing.salience must be 'ssc' or 'mid', got {salience!r}")
        if batch_size < 1:
            raise UserError(f"SalienceBalancing.batch_size must be >= 1, got {batch_size}")
        self.salience, self.batch_size = salience, batch_size

    def apply(self, model: nn.Module, calibration: Dataset) -> dict:
        report = balance_model(model, calibration, salience=self.salience, batch_size=self.batch_size)
        return {"salience": self.salience, **report}


class TemporalSmoothing(Preprocessing):
    """DiTAS's temporal-aggregated smoothing with a per-input α grid search, folded into the weights.

    For q/k/v (shared input), the attention output projection, fc1 and fc2 of every block: a_j = max |X_j| over
    the whole calibration trajectory, s_j = a_j^α / w_j^(1−α); α per input minimises the layer's quantized output
    MSE over the calibration set (see ``ditquant.methods.smoothing``). q/k/v's and fc1's s fold into the adaLN
    modulation, the attention output's into V's rows, fc2's is divided on the fly (GELU sits in front of it).

    Args:
        alphas: the α grid searched per input (default 0, 0.05, …, 1).
        alpha: a fixed α for every input instead of the search (the "smoothing only" ablation).
        batch_size: calibration rows per statistics forward.
    """

    name = "temporal_smoothing"

    def __init__(self, alphas: Optional[list[float]] = None, alpha: Optional[float] = None, batch_size: int = 32):
        super().__init__()
        self.alphas = check_alphas(list(ALPHA_GRID) if alphas is None else alphas)
        if alpha is not None:
            check_alphas([alpha])
        if batch_size < 1:
            raise UserError(f"TemporalSmoothing.batch_size must be >= 1, got {batch_size}")
        self.alpha, self.batch_size = alpha, batch_size

    def apply(self, model: nn.Module, calibration: Dataset) -> dict:
        return smooth_model(model, calibration, self.alphas, self.alpha, self.batch_size)


class LowRankCompensation(Preprocessing):
    """DiTAS's training-free LoRA for weights: per layer, W_q = Q(W − L·R) and L·R the rank-r SVD of W − W_q,
    alternated ``iterations`` times (best iterate kept); the FP branch L·R reads the quantized activation. List it
    after a smoothing callback: it fixes the quantized weights, so folds must come first.

    Args:
        rank: r (DiTAS: 32).
        iterations: alternations (DiTAS: 10).
        roles: layer roles to compensate (DiTAS: the four block linears).
    """

    name = "low_rank_compensation"

    def __init__(self, rank: int = 32, iterations: int = 10, roles: Optional[list[str]] = None):
        super().__init__()
        if iterations < 1:
            raise UserError(f"LowRankCompensation.iterations must be >= 1, got {iterations}")
        self.rank, self.iterations = rank, iterations
        self.roles = list(roles) if roles is not None else list(BLOCK_LINEAR_ROLES)
        if unknown := sorted(set(self.roles) - set(ROLES)):
            raise UserError(f"LowRankCompensation.roles: unknown role(s) {unknown}; known roles: {', '.join(ROLES)}")

    def apply(self, model: nn.Module, calibration: Dataset) -> dict:
        return compensate_low_rank(model, self.rank, self.iterations, self.roles)


class GranularitySearch(Preprocessing):
    """Q-DiT's evolutionary search of per-layer group sizes (see ``ditquant.methods.granularity``).

    Candidates are scored with round-to-nearest weights and the configured (dynamic) activation quantizers, by the
    FID of a fixed seeded sample set (``ditquant.evaluation.sample_fid``). The best group sizes are applied to the
    model (and its QuantConfig, so checkpoints and ``quantized/`` record them) and written to ``output``, a config
    overlay a later fit loads with ``--config`` (the search is then skipped). After every generation the fit's
    ``last.ckpt`` is saved, so ``--ckpt_path last`` resumes the search at the generation it stopped in.

    Args:
        space: the group sizes searched (Q-DiT: 32, 64, 128, 192, 288), per layer those dividing its input width.
        budget_group_size: the constraint's budget is the cost of this size everywhere (Q-DiT: 128).
        constraint: ``scales`` (Σ out·in/g: each layer weighed by its size) or ``mean_group_size`` (Q-DiT's code).
        population, top_k, mutations, crossovers, mutation_prob, generations: the evolution (Q-DiT: 50, 10, 25,
            25, 0.1, 20); generation 0 is the initial population.
        num_samples, batch_size: the fitness sample set (Q-DiT: 800 images) and its sampling batch.
        sampler: the fitness sampler; null = the model's (Q-DiT searches with DDIM 50 without guidance:
            ``{kind: ddim, num_steps: 50, cfg_scale: 1.0}``).
        reference: FID against the FP model's samples of the same seeds (``fp``) or the real data (``data``, the
            paper's choice; shipped statistics exist for the bundled domain only).
        features: the FID feature extractor (``auto``: the model's domain).
        seed: seeds the sample set and the evolution.
        output: the result YAML (default ``<default_root_dir>/group_sizes.yaml``).
    """

    name = "granularity_search"

    def __init__(self, space: list[int] = list(SEARCH_SPACE), budget_group_size: int = 128,
                 constraint: Literal["scales", "mean_group_size"] = "scales", population: int = 50, top_k: int = 10,
                 mutations: int = 25, crossovers: int = 25, mutation_prob: float = 0.1, generations: int = 20,
                 num_samples: int = 800, batch_size: int = 64, sampler: Optional[SamplerConfig] = None,
                 reference: Literal["fp", "data"] = "fp", features: str = "auto", seed: int = 0,
                 output: Optional[str] = None):
        super().__init__()
        if not space or any(not isinstance(g, int) or g < 1 for g in space):
            raise UserError(f"GranularitySearch.space must be a non-empty list of positive sizes, got {space}")
        if budget_group_size < 1 or num_samples < 2 or batch_size < 1:
            raise UserError("GranularitySearch: budget_group_size and batch_size must be >= 1 and num_samples >= 2")
        if reference not in ("fp", "data"):
            raise UserError(f"GranularitySearch.reference must be 'fp' or 'data', got {reference!r}")
        self.settings = EvolutionSettings(population, top_k, mutations, crossovers, mutation_prob, generations, seed)
        self.space, self.budget_group_size, self.constraint = tuple(space), budget_group_size, constraint
        self.num_samples, self.batch_size, self.sampler = num_samples, batch_size, sampler
        self.reference, self.features, self.seed, self.output = reference, features, seed, output
        self._resume: Optional[dict] = None  # the search state after the last finished generation

    def _new_search(self, pl_module) -> Optional[EvolutionarySearch]:
        """The search over the model's group-wise layers (None: group sizes given); raises on bad input."""
        if pl_module.quant is None or pl_module.quant.layer_group_sizes:
            return None
        genes = search_genes(pl_module.transformer, self.space)
        layers = {name for gene in genes for name in gene.layers}
        if any(q.input_quantizer.enabled and not q.input_quantizer.spec.dynamic
               for q in quant_layers(pl_module.transformer) if q.name in layers):
            raise UserError("GranularitySearch scores candidates without calibration: the group-wise layers need "
                            "dynamic activation quantization (model.quant.activation.dynamic: true)")
        return EvolutionarySearch(genes, self.settings, self.budget_group_size, self.constraint)

    def check(self, pl_module) -> None:
        if self._new_search(pl_module) is not None:  # the fitness must be computable before any recording
            self._fitness(pl_module)

    def _fitness(self, pl_module) -> SampleSetFID:
        features = pl_module.evaluation.fid_features if self.features == "auto" else self.features
        try:
            return SampleSetFID(pl_module.dit_config, pl_module.dit_source, self.sampler or pl_module.sampler,
                                self.num_samples, self.batch_size, self.seed, self.reference, features,
                                pl_module.vae, pl_module.latent_scale)
        except UserError as e:
            where = ("GranularitySearch.features" if self.features != "auto" else
                     "GranularitySearch.features: auto = model.evaluation.fid_features")
            raise UserError(f"{where} ({features!r}): {e}") from None

    def run(self, trainer, pl_module) -> dict:
        model, quant = pl_module.transformer, pl_module.quant
        search = self._new_search(pl_module)
        if search is None:
            log.info("granularity search skipped: model.quant.layer_group_sizes is given")
            return {"skipped": "model.quant.layer_group_sizes is given"}
        genes = search.genes
        previous_seconds = 0.0
        if self._resume is not None:
            search.load_state_dict(self._resume["search"])
            previous_seconds = self._resume["seconds"]
        started = time.perf_counter()
        fid = self._fitness(pl_module)

        def score(genome) -> float:
            apply_group_sizes(model, replace(quant, layer_group_sizes=layer_group_sizes(genome, genes)))
            return fid(model)

        while not search.finished:
            search.step(score)
            apply_group_sizes(model, quant)  # the configured sizes again: a checkpoint's model matches the config
            self._resume = {"search": search.state_dict(),
                            "seconds": previous_seconds + time.perf_counter() - started}
            log.info("granularity search: generation %d, best FID %.3f", search.generation - 1,
                     search.scores[search.best])
            if search.finished:
                break
            save_last(trainer)
        sizes = layer_group_sizes(search.best, genes)
        pl_module.set_layer_group_sizes(sizes)
        out = Path(self.output or Path(trainer.default_root_dir) / "group_sizes.yaml")
        report = {"best_fid": search.scores[search.best], "evaluated": len(search.scores),
                  "generations": search.generation, "constraint": self.constraint,
                  "cost": cost(search.best, genes, self.constraint), "budget": search.budget,
                  "gene_sizes": {gene.key: g for gene, g in zip(genes, search.best)}, "history": search.history,
                  "output": str(out), "seconds": previous_seconds}
        self._write_result(out, sizes, report)
        return report

    def _write_result(self, path: Path, sizes: dict[str, int], report: dict) -> None:
        header = (f"# Q-DiT granularity search result (ditquant GranularitySearch): best fitness FID "
                  f"{report['best_fid']:.4f} over {report['evaluated']} candidates in {report['generations']} "
                  f"generations;\n# constraint {report['constraint']}: cost {report['cost']:.6g} <= budget "
                  f"{report['budget']:.6g} (group size {self.budget_group_size} everywhere). Load it with\n"
                  "#   ditquant fit --config <method config> --config <this file>\n")
        with atomic_write(path) as tmp:
            tmp.write_text(header + yaml.safe_dump({"model": {"quant": {"layer_group_sizes": sizes}}},
                                                   sort_keys=False))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "resume": self._resume}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._resume = state_dict.get("resume")


class GPTQ(Preprocessing):
    """GPTQ weights (Q-DiT): per Linear, column-by-column quantization with Hessian-weighted error feedback, each
    layer with its own group size (see ``ditquant.methods.gptq``). List it after a granularity search; it fixes
    the weights, so it replaces round-to-nearest, and excludes ``model.reconstruction`` (AdaRound), the
    alternative weight method.

    Args:
        blocksize: columns per lazy update (128).
        damping: added to H's diagonal, as a fraction of its mean (0.01).

    The Hessians are accumulated over the calibration set in batches of ``data.batch_size``.
    """

    name = "gptq"

    def __init__(self, blocksize: int = 128, damping: float = 0.01):
        super().__init__()
        check_options(blocksize, damping)
        self.blocksize, self.damping = blocksize, damping

    def check(self, pl_module) -> None:
        if pl_module.reconstruction is not None:
            raise UserError("GPTQ and model.reconstruction (AdaRound) both set the weights: use one (set "
                            "model.reconstruction: null, or drop the GPTQ callback)")

    def run(self, trainer, pl_module) -> dict:
        return quantize_model_gptq(pl_module.transformer, trainer.datamodule.calibration_loader(), self.blocksize,
                                   self.damping)
