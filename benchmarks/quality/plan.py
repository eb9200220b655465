"""What the quality benchmark trains: the models, their `ncguard train` flags, and the budgets.

One place for the model list so the training stage, the evaluation stage and the report agree on
names. `--size smoke` swaps Fashion-MNIST for a tiny budget so CI can run the whole pipeline;
`--size study` is seed 0 of both heads plus the training variants (about 2 hours on 2 cores instead
of about 3.5), for a round that studies the defaults rather than re-measuring them over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LAYERS = "block1,block2,block3,transfer,detection"
NEAR_OOD_KNOWN = (0, 1, 2, 3, 4, 5)  # T-shirt, trouser, pullover, dress, coat, sandal; 6-9 are OOD


@dataclass(frozen=True)
class ModelSpec:
    name: str
    head: str  # "etf" (ours) or "plain" (the baseline)
    seed: int
    flags: tuple[str, ...] = ()
    task: str = "full"  # "full": all 10 classes; "near": the 6 known classes of the near-OOD split
    role: str = "main"  # "main": reported with mean and spread over seeds; "ablation": one seed, for the study

    @property
    def group(self) -> str:
        """Seeds of one configuration share a group."""
        return self.name.rsplit("-s", 1)[0]


@dataclass(frozen=True)
class Budget:
    name: str
    seeds: tuple[int, ...]
    epochs: int | None  # None: ncguard train's default
    id_test: int | None  # None: the whole test split
    ood_per_set: int
    ablations: bool
    train_limit: int | None = None  # None: the whole Fashion-MNIST training split
    extra_flags: tuple[str, ...] = field(default=())
    near_ood: bool = True  # train the near-OOD pair (6 known classes)
    published: str | None = None  # folder under benchmarks/results its report goes to by default; None: WORK/report
    settle_seconds: float = 240.0  # the cost stage waits up to this long for the load average to settle
    probe_folds: int = 5  # cross-validation folds of the transfer probe


BUDGETS = {
    "full": Budget("full", seeds=(0, 1, 2), epochs=None, id_test=None, ood_per_set=2000, ablations=True, published=""),
    "study": Budget("study", seeds=(0,), epochs=None, id_test=None, ood_per_set=2000, ablations=True, near_ood=False, published="study"),
    "smoke": Budget("smoke", seeds=(0,), epochs=1, id_test=300, ood_per_set=100, ablations=False, train_limit=1200, settle_seconds=0.0, probe_folds=2),
}

# Training variants, one seed each (~15 min apiece on 2 cores: 12 epochs of ~68 s, fitting, evaluation): the study behind the defaults.
ABLATIONS = (
    ("etf-nols", "etf", ("--label-smoothing", "0")),
    ("etf-ent0.5", "etf", ("--entropy-weight", "0.5")),
    ("etf-simplex", "etf", ("--classifier", "simplex")),
    ("etf-simplex-ent0.5", "etf", ("--classifier", "simplex", "--entropy-weight", "0.5")),  # the two best single changes
    # h without the head's final ReLU, for both heads (a backbone change, so the baseline changes too)
    ("etf-linear", "etf", ("--arch", "cnn-linear")),
    ("plain-linear", "plain", ("--arch", "cnn-linear")),
)


def model_specs(budget: Budget) -> list[ModelSpec]:
    """Seed 0 of both heads first, then the near-OOD pair, the other seeds, and the ablations."""
    specs = [ModelSpec(f"{head}-s{budget.seeds[0]}", head, budget.seeds[0]) for head in ("etf", "plain")]
    if budget.near_ood:
        specs += [ModelSpec(f"near-{head}-s{budget.seeds[0]}", head, budget.seeds[0], task="near") for head in ("etf", "plain")]
    specs += [ModelSpec(f"{head}-s{seed}", head, seed) for seed in budget.seeds[1:] for head in ("etf", "plain")]
    if budget.ablations:
        specs += [ModelSpec(f"{name}-s0", head, 0, flags, role="ablation") for name, head, flags in ABLATIONS]
    return specs


def train_flags(spec: ModelSpec, budget: Budget) -> list[str]:
    # shift-flip is what `ncguard train` picks for fashion-mnist; the .npz subsets must get it too
    flags = ["--augment", "shift-flip", "--head", spec.head, "--seed", str(spec.seed), "--layers", LAYERS, *spec.flags, *budget.extra_flags]
    if budget.epochs is not None:
        flags += ["--epochs", str(budget.epochs)]
    return flags
