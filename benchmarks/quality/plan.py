"""What the quality benchmark trains: the models, their `ncguard train` flags, and the budgets.

One place for the model list so the training stage, the evaluation stage and the report agree on
names. `--size smoke` swaps Fashion-MNIST for a tiny budget so CI can run the whole pipeline;
`--size study` is seed 0 of both heads plus the training variants (about 2 hours on 2 cores instead
of about 3.5), for a round that studies the defaults rather than re-measuring them over seeds.
`--size near` is the near-OOD round on its own: both heads on three 6/4 class splits of
Fashion-MNIST (NEAR_SPLITS) plus one small "proxy" model per split for the ID-only choice of the
fused score's components (benchmarks/quality/select.py); its report is benchmarks/results/near/.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LAYERS = "block1,block2,block3,transfer,detection"
NEAR_OOD_KNOWN = (0, 1, 2, 3, 4, 5)  # T-shirt, trouser, pullover, dress, coat, sandal; 6-9 are OOD

# Near-OOD splits of Fashion-MNIST's classes (0 T-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat,
# 5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot): 6 known classes each, the other 4 unseen.
# Chosen by class semantics only (no model was scored to pick them) so that every class is unseen in
# at least one split and every split holds out an upper-body garment whose look-alikes stay known, a
# shoe while another shoe stays known, and one class with no close look-alike:
#   a: unseen shirt, sneaker, bag, ankle boot (the benchmark's original split; shirt vs T-shirt/pullover/coat, shoes vs sandal)
#   b: unseen T-shirt, pullover, sandal, bag   (tops vs shirt/coat, sandal vs sneaker/boot)
#   c: unseen trouser, dress, coat, sneaker     (coat vs pullover/shirt, sneaker vs sandal/boot, trouser alone)
NEAR_SPLITS = {
    "a": NEAR_OOD_KNOWN,
    "b": (1, 3, 4, 6, 7, 9),
    "c": (0, 2, 5, 6, 8, 9),
}
# The ID-only proxy of each split: a model trained on 4 of its 6 known classes, the other 2 known
# classes standing in for unseen ones (no unseen class is ever used to choose). The 2 are chosen, by
# semantics again, to each keep a look-alike among the 4, so the proxy is a near-OOD question too.
PROXY_HELD_OUT = {
    "a": (2, 3),  # pullover (coat, T-shirt stay), dress (T-shirt stays); trains on T-shirt, trouser, coat, sandal
    "b": (4, 7),  # coat (shirt stays), sneaker (ankle boot stays); trains on trouser, dress, shirt, ankle boot
    "c": (6, 9),  # shirt (T-shirt, pullover stay), ankle boot (sandal stays); trains on T-shirt, pullover, sandal, bag
}


def known_classes(task: str, split: str) -> tuple[int, ...]:
    """The Fashion-MNIST classes a model of this task trains on, in label order (all 10 for "full")."""
    if task == "near":
        return NEAR_SPLITS[split]
    if task == "proxy":
        return tuple(c for c in NEAR_SPLITS[split] if c not in PROXY_HELD_OUT[split])
    return tuple(range(10))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    head: str  # "etf" (ours) or "plain" (the baseline)
    seed: int
    flags: tuple[str, ...] = ()
    task: str = "full"  # "full": all 10 classes; "near": the 6 known classes of a near-OOD split; "proxy": 4 of them
    role: str = "main"  # "main": reported with mean and spread over seeds; "ablation": one seed, for the study
    split: str = ""  # near and proxy tasks: the key of NEAR_SPLITS

    @property
    def data_key(self) -> str:
        """The training set's key in train.training_sets: "full", "near-a", "proxy-a", ..."""
        return self.task if self.task == "full" else f"{self.task}-{self.split}"

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
    near_splits: tuple[str, ...] = ("a", "b", "c")  # near-OOD splits to train both heads on (keys of NEAR_SPLITS)
    near_seeds: tuple[int, ...] = (0,)  # seeds of every near-OOD pair
    proxies: bool = True  # train the ID-only proxy model (our head, seed 0) of every near split
    full_models: bool = True  # train the 10-class models (False: the near-OOD round alone)
    # Epochs of the near-OOD and proxy models: 12, the 10-class default (`ncguard train`'s own default
    # aims at ~5000 steps: 20 epochs on 6 classes, 30 on a proxy's 4). None: `epochs`.
    near_epochs: int | None = 12
    published: str | None = None  # folder under benchmarks/results its report goes to by default; None: WORK/report
    settle_seconds: float = 240.0  # the cost stage waits up to this long for the load average to settle
    probe_folds: int = 5  # cross-validation folds of the transfer probe


BUDGETS = {
    "full": Budget("full", seeds=(0, 1, 2), epochs=None, id_test=None, ood_per_set=2000, ablations=True, near_seeds=(0, 1), published=""),
    "study": Budget("study", seeds=(0,), epochs=None, id_test=None, ood_per_set=2000, ablations=True, near_splits=(), proxies=False, published="study"),
    # The near-OOD round alone: 3 splits x 2 heads x 2 seeds + 3 proxies (seed 0 of every split and the
    # proxies come first: about 1.2 hours on 2 quiet cores; seed 1 another 0.7); same runs as the full size's.
    "near": Budget("near", seeds=(0,), epochs=None, id_test=None, ood_per_set=2000, ablations=False, near_seeds=(0, 1), full_models=False, published="near", settle_seconds=0.0),
    # The two 10-class models at the defaults, seed 0, nothing else: the check of the defaults' goals that
    # need full-size models (far OOD, calibrated confidence, the bring-your-own rows) in about 45 minutes.
    "check": Budget("check", seeds=(0,), epochs=None, id_test=None, ood_per_set=2000, ablations=False, near_splits=(), proxies=False, published="check"),
    "smoke": Budget("smoke", seeds=(0,), epochs=1, id_test=300, ood_per_set=100, ablations=False, train_limit=1200, settle_seconds=0.0, probe_folds=2, near_splits=("a", "b"), near_epochs=None),
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


def near_specs(budget: Budget, seed: int) -> list[ModelSpec]:
    """Per split: both heads, then (seed 0 only) the split's proxy; a split at a time, so a cut-short run has whole splits."""
    specs = []
    for split in budget.near_splits:
        specs += [ModelSpec(f"near-{split}-{head}-s{seed}", head, seed, task="near", split=split) for head in ("etf", "plain")]
        if budget.proxies and seed == 0:
            specs.append(ModelSpec(f"proxy-{split}-etf-s0", "etf", 0, task="proxy", split=split, role="proxy"))
    return specs


def model_specs(budget: Budget) -> list[ModelSpec]:
    """Seed 0 of both heads first, then the near-OOD splits (seed 0), the other seeds, and the ablations."""
    specs = [ModelSpec(f"{head}-s{budget.seeds[0]}", head, budget.seeds[0]) for head in ("etf", "plain")] if budget.full_models else []
    if budget.near_seeds:
        specs += near_specs(budget, budget.near_seeds[0])
    if budget.full_models:
        specs += [ModelSpec(f"{head}-s{seed}", head, seed) for seed in budget.seeds[1:] for head in ("etf", "plain")]
    for seed in budget.near_seeds[1:]:
        specs += near_specs(budget, seed)
    if budget.ablations:
        specs += [ModelSpec(f"{name}-s0", head, 0, flags, role="ablation") for name, head, flags in ABLATIONS]
    return specs


def train_flags(spec: ModelSpec, budget: Budget) -> list[str]:
    # shift-flip is what `ncguard train` picks for fashion-mnist; the .npz subsets must get it too
    flags = ["--augment", "shift-flip", "--head", spec.head, "--seed", str(spec.seed), "--layers", LAYERS, *spec.flags, *budget.extra_flags]
    epochs = budget.near_epochs if spec.task != "full" and budget.near_epochs is not None else budget.epochs
    if epochs is not None:
        flags += ["--epochs", str(epochs)]
    return flags
