"""Q-DiT's automatic granularity search: an evolutionary search over per-layer group sizes.

Genome: one group size per quantized input (a gene), for the group-wise layers of the model in forward order; q/k/v
read one input and share one gene (Q-DiT's fused qkv), every other layer has its own. A gene takes sizes from the
search space that divide its input width (an error names any layer none divides).

Constraint, with a budget equal to the cost of one reference group size everywhere (Q-DiT: 128):

- ``scales`` (default): Σ_layers out·in/g, the number of weight groups. It weighs each layer by its size: a
  group-wise GEMM rescales every group's partial sum per token (bit-operations) and stores one scale and zero
  point per group (memory), and both grow as out·in/g.
- ``mean_group_size``: the official code's proxy, mean(g) ≥ reference, which counts fc1/fc2 (4× larger in DiT) the
  same as q/k/v.

Evolution (Q-DiT / OFA): a population of ``population``; each generation keeps the ``top_k`` best of the previous
top-k merged with the new candidates (the merge the official code lost, so the best is never dropped), then breeds
``mutations`` children (a random top-k parent, every gene resampled with probability ``mutation_prob``) and
``crossovers`` children (two random top-k parents, each gene from either), all legal and unseen (at most 10× the
quota in attempts each), and fills up with random legal candidates (up to 1000× attempts: under a tight budget
most uniformly drawn genomes break it). Randomness is seeded per generation, and the
state (population, scores, top-k) is plain data, so a search resumes where it stopped.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar, Literal, Optional

import yaml

from torch import nn

from ditquant.diffusion.samplers import SamplerConfig
from ditquant.errors import UserError
from ditquant.io import atomic_write
from ditquant.methods.base import Method, MethodContext, register
from ditquant.quant.apply import apply_plan
from ditquant.quant.modules import quant_layers

log = logging.getLogger(__name__)

SEARCH_SPACE = (32, 64, 128, 192, 288)
CONSTRAINTS = ("scales", "mean_group_size")
Genome = tuple[int, ...]


def gene_key(layer_name: str) -> str:
    """Layers reading the same input share a gene: q/k/v -> one key."""
    for proj in ("to_q", "to_k", "to_v"):
        if layer_name.endswith(f"attn1.{proj}"):
            return layer_name[: -len(proj)] + "to_qkv"
    return layer_name


@dataclass(frozen=True)
class Gene:
    key: str
    layers: tuple[str, ...]
    sizes: tuple[int, ...]   # allowed group sizes, ascending
    weight_elements: int     # Σ out·in over the gene's layers


def search_genes(model: nn.Module, space: tuple[int, ...] = SEARCH_SPACE) -> list[Gene]:
    """The genes of ``model``'s group-wise QuantLayers; raises if a layer has no size of ``space`` dividing it."""
    grouped: dict[str, list] = {}
    for q in quant_layers(model):
        if "group" in (q.weight_quantizer.spec.granularity, q.input_quantizer.spec.granularity):
            grouped.setdefault(gene_key(q.name), []).append(q)
    if not grouped:
        raise UserError("granularity search: no quantized layer is group-wise; set model.quant.weight (and "
                        "activation) granularity: group")
    genes = []
    for key, layers in grouped.items():
        width = layers[0].layer.weight[0].numel()
        sizes = tuple(sorted(g for g in set(space) if width % g == 0))
        if not sizes:
            raise UserError(f"granularity search: no size of the search space {sorted(space)} divides the "
                            f"{width} input channels of {layers[0].name}")
        genes.append(Gene(key, tuple(q.name for q in layers), sizes,
                          sum(q.layer.weight.numel() for q in layers)))
    return genes


def cost(genome: Genome, genes: list[Gene], constraint: str) -> float:
    """Lower is cheaper: weight groups (``scales``) or −mean(g) (``mean_group_size``)."""
    if constraint == "scales":
        return float(sum(gene.weight_elements / g for gene, g in zip(genes, genome)))
    return -sum(genome) / len(genome)


def budget(genes: list[Gene], reference: int, constraint: str) -> float:
    """The cost of ``reference`` as every layer's group size."""
    return cost((reference,) * len(genes), genes, constraint)


def check_feasible(genes: list[Gene], reference: int, constraint: str) -> None:
    if constraint not in CONSTRAINTS:
        raise UserError(f"granularity search: constraint must be one of {CONSTRAINTS}, got {constraint!r}")
    coarsest = tuple(gene.sizes[-1] for gene in genes)
    if cost(coarsest, genes, constraint) > budget(genes, reference, constraint) * (1 + 1e-9):
        raise UserError(f"granularity search: the constraint cannot be met: even the coarsest allowed groups "
                        f"({constraint} cost {cost(coarsest, genes, constraint):.4g}) exceed the budget of group "
                        f"size {reference} everywhere ({budget(genes, reference, constraint):.4g}); raise "
                        "budget_group_size or add larger sizes to the search space")


def layer_group_sizes(genome: Genome, genes: list[Gene]) -> dict[str, int]:
    """Layer name -> group size, the form of ``QuantConfig.layer_group_sizes``."""
    return {name: g for gene, g in zip(genes, genome) for name in gene.layers}


@dataclass(frozen=True)
class EvolutionSettings:
    population: int = 50
    top_k: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    generations: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.population < 2 or not 1 <= self.top_k <= self.population:
            raise UserError(f"granularity search needs population >= 2 and 1 <= top_k <= population, got "
                            f"population={self.population}, top_k={self.top_k}")
        if self.mutations < 0 or self.crossovers < 0 or self.mutations + self.crossovers > self.population:
            raise UserError(f"granularity search: mutations + crossovers ({self.mutations} + {self.crossovers}) must "
                            f"be non-negative and at most the population ({self.population})")
        if not 0 <= self.mutation_prob <= 1:
            raise UserError(f"granularity search: mutation_prob must be in [0, 1], got {self.mutation_prob}")
        if self.generations < 0:
            raise UserError(f"granularity search: generations must be >= 0, got {self.generations}")


class EvolutionarySearch:
    """The search's state and operators; ``step(score)`` runs one generation (0: the initial population)."""

    def __init__(self, genes: list[Gene], settings: EvolutionSettings, reference: int,
                 constraint: Literal["scales", "mean_group_size"] = "scales"):
        check_feasible(genes, reference, constraint)
        self.genes, self.settings, self.reference, self.constraint = genes, settings, reference, constraint
        self.budget = budget(genes, reference, constraint)
        self.generation = 0
        self.population: list[Genome] = []
        self.scores: dict[Genome, float] = {}
        self.top: list[Genome] = []
        self.history: list[dict] = []

    @property
    def finished(self) -> bool:
        return self.generation > self.settings.generations

    @property
    def best(self) -> Genome:
        return self.top[0]

    def legal(self, genome: Genome) -> bool:
        return cost(genome, self.genes, self.constraint) <= self.budget * (1 + 1e-9)

    def _random(self, rng: random.Random) -> Genome:
        return tuple(rng.choice(gene.sizes) for gene in self.genes)

    def _preset(self) -> Genome:
        """The reference size where a gene allows it, else its largest allowed size below it (or the smallest)."""
        return tuple(max([g for g in gene.sizes if g <= self.reference] or [gene.sizes[0]]) for gene in self.genes)

    def _breed(self, rng: random.Random) -> list[Genome]:
        s, seen = self.settings, set(self.scores)
        children: list[Genome] = []

        def add(make: Callable[[], Genome], quota: int, attempts: int = 10) -> None:
            made = 0
            for _ in range(attempts * quota):
                if made == quota:
                    break
                child = make()
                if child not in seen and self.legal(child):
                    seen.add(child)
                    children.append(child)
                    made += 1

        def mutate() -> Genome:
            parent = rng.choice(self.top)
            return tuple(rng.choice(gene.sizes) if rng.random() < s.mutation_prob else g
                         for gene, g in zip(self.genes, parent))

        def cross() -> Genome:
            a, b = rng.choice(self.top), rng.choice(self.top)
            return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))

        if self.top:
            add(mutate, s.mutations)
            add(cross, s.crossovers)
        else:
            preset = self._preset()
            if self.legal(preset):
                seen.add(preset)
                children.append(preset)
        # Under a tight budget most random genomes are illegal; drawing one costs microseconds, so try many.
        add(lambda: self._random(rng), s.population - len(children), attempts=1000)
        return children

    def step(self, score: Callable[[Genome], float], on_score: Callable[[], None] = lambda: None) -> None:
        """One generation: breed (unless a resumed population is pending), score the unscored, update the top-k."""
        if not self.population:
            self.population = self._breed(random.Random(self.settings.seed * 7919 + self.generation))
        for genome in self.population:
            if genome not in self.scores:
                self.scores[genome] = score(genome)
                on_score()
        merged = sorted(set(self.top) | set(self.population), key=lambda g: (self.scores[g], g))
        self.top = merged[: self.settings.top_k]
        fitness = [self.scores[g] for g in self.population]
        self.history.append({"generation": self.generation, "evaluated": len(self.population),
                             "best": self.scores[self.best], "population_best": min(fitness, default=None),
                             "population_mean": sum(fitness) / len(fitness) if fitness else None,
                             "best_cost": cost(self.best, self.genes, self.constraint)})
        self.population = []
        self.generation += 1

    def state_dict(self) -> dict:
        return {"generation": self.generation, "population": [list(g) for g in self.population],
                "scores": [[list(g), v] for g, v in self.scores.items()], "top": [list(g) for g in self.top],
                "history": list(self.history), "keys": [gene.key for gene in self.genes]}

    def load_state_dict(self, state: dict) -> None:
        if state["keys"] != [gene.key for gene in self.genes]:
            raise UserError("granularity search: the checkpoint's search was over other layers; start a new fit")
        self.generation = state["generation"]
        self.population = [tuple(g) for g in state["population"]]
        self.scores = {tuple(g): v for g, v in state["scores"]}
        self.top = [tuple(g) for g in state["top"]]
        self.history = list(state["history"])


def search_group_sizes(model: nn.Module, quant, search: EvolutionarySearch, fitness: Callable[[nn.Module], float],
                       on_generation: Callable[[EvolutionarySearch], None] = lambda search: None) -> dict[str, int]:
    """Run ``search`` to the end, scoring each candidate layout by ``fitness(model)`` (lower is better) with the
    candidate's group sizes applied; ``on_generation`` sees the search after every generation but the last (to save
    it). Leaves the model with ``quant``'s own sizes and returns the best layer -> group size."""
    def score(genome: Genome) -> float:
        apply_plan(model, replace(quant, layer_group_sizes=layer_group_sizes(genome, search.genes)))
        return fitness(model)

    while not search.finished:
        search.step(score)
        apply_plan(model, quant)  # the configured sizes again: a saved model matches the config
        log.info("granularity search: generation %d, best FID %.3f", search.generation - 1, search.scores[search.best])
        if not search.finished:
            on_generation(search)
    return layer_group_sizes(search.best, search.genes)


@register
@dataclass
class GranularitySearch(Method):
    """Q-DiT's evolutionary search of per-layer group sizes.

    Candidates are scored with round-to-nearest weights and the configured (dynamic) activation quantizers, by the
    FID of a fixed seeded sample set (``MethodContext.scorer``). The best group sizes are applied to the model (and
    its QuantConfig, through ``MethodContext.set_quant``, so checkpoints and ``quantized/`` record them) and
    written to ``output``, a config overlay a later fit loads with ``--config`` (the search is then skipped). The
    search state is saved after every generation (``MethodContext.save_progress``), so an interrupted fit resumes
    at the generation it stopped in.

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
        output: the result YAML (default ``<run folder>/group_sizes.yaml``).
    """

    name: ClassVar[str] = "granularity_search"
    changes: ClassVar[frozenset] = frozenset({"group_sizes"})
    space: list[int] = field(default_factory=lambda: list(SEARCH_SPACE))
    budget_group_size: int = 128
    constraint: Literal["scales", "mean_group_size"] = "scales"
    population: int = 50
    top_k: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    generations: int = 20
    num_samples: int = 800
    batch_size: int = 64
    sampler: Optional[SamplerConfig] = None
    reference: Literal["fp", "data"] = "fp"
    features: str = "auto"
    seed: int = 0
    output: Optional[str] = None

    def __post_init__(self):
        if not self.space or any(not isinstance(g, int) or g < 1 for g in self.space):
            raise UserError(f"GranularitySearch.space must be a non-empty list of positive sizes, got {self.space}")
        if self.budget_group_size < 1 or self.num_samples < 2 or self.batch_size < 1:
            raise UserError("GranularitySearch: budget_group_size and batch_size must be >= 1 and num_samples >= 2")
        if self.reference not in ("fp", "data"):
            raise UserError(f"GranularitySearch.reference must be 'fp' or 'data', got {self.reference!r}")
        if self.constraint not in CONSTRAINTS:
            raise UserError(f"GranularitySearch.constraint must be one of {CONSTRAINTS}, got {self.constraint!r}")
        self.settings  # validates the evolution's options

    @property
    def settings(self) -> EvolutionSettings:
        return EvolutionSettings(self.population, self.top_k, self.mutations, self.crossovers, self.mutation_prob,
                                 self.generations, self.seed)

    def _new_search(self, model: nn.Module, quant) -> Optional[EvolutionarySearch]:
        """The search over the model's group-wise layers (None: group sizes given); raises on bad input."""
        if quant is None or quant.layer_group_sizes:
            return None
        genes = search_genes(model, tuple(self.space))
        layers = {name for gene in genes for name in gene.layers}
        if any(q.input_quantizer.enabled and not q.input_quantizer.spec.dynamic
               for q in quant_layers(model) if q.name in layers):
            raise UserError("GranularitySearch scores candidates without calibration: the group-wise layers need "
                            "dynamic activation quantization (model.quant.activation.dynamic: true)")
        return EvolutionarySearch(genes, self.settings, self.budget_group_size, self.constraint)

    def _fitness(self, ctx: MethodContext) -> Callable[[nn.Module], float]:
        if ctx.scorer is None:
            raise UserError("GranularitySearch needs a fitness: MethodContext.scorer (ditquant fit provides the "
                            "sample-set FID; from Python pass ditquant.sample_set_fid(loaded))")
        try:
            return ctx.scorer(sampler=self.sampler, num_samples=self.num_samples, batch_size=self.batch_size,
                              seed=self.seed, reference=self.reference, features=self.features)
        except UserError as e:
            raise UserError(f"GranularitySearch.{e}") from None

    def check(self, model: nn.Module, ctx: MethodContext) -> None:
        if self._new_search(model, ctx.quant) is not None:  # the fitness must be computable before any recording
            self._fitness(ctx)

    def apply(self, model: nn.Module, calibration, ctx: MethodContext) -> dict:
        quant = ctx.quant
        search = self._new_search(model, quant)
        if search is None:
            log.info("granularity search skipped: model.quant.layer_group_sizes is given")
            return {"skipped": "model.quant.layer_group_sizes is given"}
        previous_seconds = 0.0
        if ctx.resume is not None:
            search.load_state_dict(ctx.resume["search"])
            previous_seconds = ctx.resume["seconds"]
        started = time.perf_counter()

        def save(search: EvolutionarySearch) -> None:
            ctx.save_progress({"search": search.state_dict(),
                               "seconds": previous_seconds + time.perf_counter() - started})

        sizes = search_group_sizes(model, quant, search, self._fitness(ctx), save)
        best = replace(quant, layer_group_sizes=sizes)
        apply_plan(model, best)
        if ctx.set_quant is not None:
            ctx.set_quant(best)
        out = Path(self.output or Path(ctx.output_dir) / "group_sizes.yaml")
        report = {"best_fid": search.scores[search.best], "evaluated": len(search.scores),
                  "generations": search.generation, "constraint": self.constraint,
                  "cost": cost(search.best, search.genes, self.constraint), "budget": search.budget,
                  "gene_sizes": {gene.key: g for gene, g in zip(search.genes, search.best)},
                  "history": search.history, "output": str(out), "seconds": previous_seconds}
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
