"""Recipes and presets: the only home of defaults.

A :class:`Recipe` is every hyperparameter that determines a training result. It is
frozen and checked on construction, so a bad value fails before any data is read or
any run is created. No torch, no MLflow here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# The model registry's names (its builders are kd_mlflow.models.REGISTRY, which a test
# holds equal to this list); any Wide ResNet "wrn-D-K" with D = 6n + 4 is one too.
MODELS = (
    # torchvision's ImageNet-stem networks (7x7 stride-2 stem and max-pool), by name
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "mobilenet_v2",
    # the same ResNets with a CIFAR stem (3x3 stride 1, no max-pool)
    "resnet18-cifar",
    "resnet34-cifar",
    "resnet50-cifar",
    # He et al. (2016), section 4.2: 6n + 2 layers, 3 stages of 16/32/64 channels
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    # Zagoruyko and Komodakis (2016): the ones the KD benchmarks and the paper use
    "wrn-16-2",
    "wrn-40-2",
    "wrn-28-10",
    # torchvision's MobileNetV2 with CIFAR strides (stem and second stage stride 1)
    "mobilenetv2",
)
WRN_NAME = re.compile(r"wrn-(\d+)-(\d+)")
DATASETS = ("cifar10", "cifar100", "folder", "digits")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle", "multistep")
PRECISIONS = ("auto", "fp32", "bf16")
COMBINES = ("prob", "logit")  # ensembles: average probabilities (the report) or logits
FORMATS = ("markdown", "csv", "json")  # compare's output
MODEL_FORMATS = ("table", "json")  # `kd-mlflow models`' output
SEARCHES = ("grid", "optuna")  # how `kd-mlflow sweep` picks its settings
EXECUTORS = ("local", "ray")

# The report's mechanism first, then kd-mlflow's own:
SPLIT_STYLES = ("random_split", "head")  # val = the permutation's tail, as random_split | its head
ORDER_STYLES = ("dataloader", "randperm")  # DataLoader(shuffle=True, generator) | one randperm
INIT_STYLES = ("torchvision-fc", "direct")  # resnet18() (1000 classes), new fc | built at num_classes
RESIZES = ("pil", "float")  # bilinear, each pass rounded to uint8 as PIL | one float pass
DISTILL_LOSSES = ("soft-ce", "kl")  # the report's clamped soft-target CE | Hinton's T^2 KL
# An ensemble teacher's target at T (kd_mlflow.objectives.ensemble_target): its output
# softened (today's) | the mean of its members' softened outputs | their mean logits softened
TEACHER_TARGETS = ("output", "softened-members", "mean-logit")
# A joint model's gradient per member (kd_mlflow.pack.JointModel): 1/K of a lone network's | a lone's
JOINT_GRADS = ("mean", "lone")

# One table of choices: the recipe's checks and the CLI's options both read it
# ("preset" is added below PRESETS).
CHOICES: dict[str, tuple] = {
    "dataset": DATASETS,
    "model": MODELS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "precision": PRECISIONS,
    "split_style": SPLIT_STYLES,
    "order_style": ORDER_STYLES,
    "init_style": INIT_STYLES,
    "resize": RESIZES,
    "distill_loss": DISTILL_LOSSES,
    "teacher_target": TEACHER_TARGETS,
    "joint_grad": JOINT_GRADS,
    "combine": COMBINES,
    "format": FORMATS,
    "model_format": MODEL_FORMATS,
    "executor": EXECUTORS,
    "search": SEARCHES,
}

# How a yes/no value may be written (the CLI, and MLflow's `-P augment=true`).
YES_NO = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}

# Fields that only a student's result depends on: never part of a teacher's identity.
STUDENT_FIELDS = ("temperature", "alpha", "distill_loss", "student_init_skip", "teacher_target")
# Fields that only a joint model's result depends on: part of no other role's identity.
JOINT_FIELDS = ("joint_grad",)
# Fields with no effect on any result.
NEUTRAL_FIELDS = ("eval_batch_size", "test_each_epoch")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # as RepDistiller normalises
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


class ConfigError(ValueError):
    """A bad value: ``name`` is the option or parameter it came from."""

    def __init__(self, name: str, value, reason: str):
        reason = " ".join(str(reason).split())  # always one line, whatever it quotes
        self.name, self.value, self.reason = name, value, reason
        super().__init__(f"invalid value for {name}: {value!r} ({reason})")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(name, value, ok, reason):
    if not ok(value):
        raise ConfigError(name, value, reason)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ConfigError(name, value, f"not one of {', '.join(choices)}")


def check_model(name) -> str:
    """A registry name: one of MODELS, or wrn-D-K for any depth D = 6n + 4 and width K."""
    wrn = WRN_NAME.fullmatch(name) if isinstance(name, str) else None
    if name in MODELS or (wrn and int(wrn[1]) % 6 == 4 and int(wrn[1]) >= 10 and int(wrn[2]) >= 1):
        return name
    raise ConfigError(
        "model", name, f"not a model: choose from {', '.join(MODELS)}, or wrn-D-K with D = 6n + 4 (n >= 1), K >= 1"
    )


# A recipe's width that builds each model as published (its channels x 64/64): the
# width `kd-mlflow models` lists by default, and a study's `--student-model`'s.
PUBLISHED_WIDTH = 64


def architecture(model: str, width: int) -> str:
    """A network's architecture in words: the model, and its width where it is not the
    published one ("resnet20", "resnet20@w16"). A student is SD only when this is its
    teacher's."""
    return model if width == PUBLISHED_WIDTH else f"{model}@w{width}"


@dataclass(frozen=True)
class Recipe:
    dataset: str = "cifar10"
    model: str = "resnet18"  # a name of the model registry (kd-mlflow models lists them)
    width: int = PUBLISHED_WIDTH  # 64ths of the published network's channels: 64 = as published;
    # ResNet-18/34/50: the first stage's channels (kd_mlflow.models says it per family)
    image_size: int = 224  # pixels; images are resized per batch on the device
    mean: tuple = (0.5, 0.5, 0.5)  # normalisation, per channel, of [0, 1] pixels
    std: tuple = (0.5, 0.5, 0.5)
    optimizer: str = "adam"
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    weight_decay: float = 0.0  # L2, coupled (torch's weight_decay)
    schedule: str = "constant"
    warmup: float = 0.25  # onecycle only: share of the steps spent warming up
    batch_size: int = 128  # images per step
    epochs: int = 100
    augment: bool = False  # random crop + horizontal flip, on the device
    crop_padding: int = 4  # pixels of zero padding before the random crop (augment only)
    val_size: int = 5000  # images held out of train for model selection
    train_subset: int = 0  # train on only this many images (0 = all the rest)
    split_seed: int = 42  # fixes the train/val split; never the model seed
    order_seed: int = 42  # fixes batch order and augmentation; never the model seed
    temperature: float = 1.0  # distillation only
    alpha: float = 1.0  # weight of the soft (teacher) term; 1 - alpha on labels
    precision: str = "fp32"  # auto = bf16 autocast on cuda (and see cpu_precision), fp32 elsewhere
    eval_batch_size: int = 512  # images per evaluation step (no effect on results)
    test_each_epoch: bool = True  # a test accuracy per epoch; False: once, on the selected
    # weights (the same final result, one test pass per run)
    # How the report did it (the defaults) or kd-mlflow's own mechanism; see
    # docs/fidelity.md.
    split_style: str = "random_split"  # which end of the split permutation is validation
    order_style: str = "dataloader"  # how an epoch's batch order is drawn from order_seed
    init_style: str = "torchvision-fc"  # which construction's random draws initialise the net
    resize: str = "pil"  # how images are resized to image_size
    distill_loss: str = "soft-ce"  # the soft (teacher) term of distillation
    student_init_skip: int = 1  # networks drawn and thrown away before an SD student
    # Added later: left out of the digest at their defaults (LATER_FIELDS).
    milestones: tuple = ()  # multistep only: epochs after which the lr is multiplied by gamma
    gamma: float = 0.1  # multistep only: the lr's factor at each milestone
    teacher_target: str = "output"  # an ensemble teacher's target at T (TEACHER_TARGETS)
    joint_grad: str = "mean"  # a joint model's gradient per member (JOINT_GRADS)

    def __post_init__(self):
        check_model(self.model)
        for name in (
            "dataset",
            "optimizer",
            "schedule",
            "precision",
            "split_style",
            "order_style",
            "init_style",
            "resize",
            "distill_loss",
            "teacher_target",
            "joint_grad",
        ):
            _check_choice(name, getattr(self, name), CHOICES[name])
        for name in ("width", "image_size", "batch_size", "epochs", "val_size", "eval_batch_size"):
            _check(name, getattr(self, name), lambda v: _is_int(v) and v >= 1, "must be an integer >= 1")
        for name in ("train_subset", "split_seed", "order_seed", "crop_padding", "student_init_skip"):
            _check(name, getattr(self, name), lambda v: _is_int(v) and v >= 0, "must be an integer >= 0")
        _check("lr", self.lr, lambda v: _is_num(v) and v > 0, "must be > 0")
        _check("temperature", self.temperature, lambda v: _is_num(v) and v > 0, "must be > 0")
        _check("alpha", self.alpha, lambda v: _is_num(v) and 0 <= v <= 1, "must be in [0, 1]")
        _check("warmup", self.warmup, lambda v: _is_num(v) and 0 < v < 1, "must be in (0, 1)")
        _check("momentum", self.momentum, lambda v: _is_num(v) and 0 <= v < 1, "must be in [0, 1)")
        _check("weight_decay", self.weight_decay, lambda v: _is_num(v) and v >= 0, "must be >= 0")
        for name in ("mean", "std"):
            _check(name, getattr(self, name), lambda v: len(v) == 3 and all(_is_num(x) for x in v), "must be 3 numbers")
        _check("std", self.std, lambda v: all(x > 0 for x in v), "must be > 0")
        _check("gamma", self.gamma, lambda v: _is_num(v) and v > 0, "must be > 0")
        _check(
            "milestones",
            self.milestones,
            lambda v: all(_is_int(m) and m >= 1 for m in v) and list(v) == sorted(set(v)),
            "must be increasing epochs >= 1, e.g. 60,120,160",
        )
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("milestones", self.milestones, "a multistep schedule needs milestones, e.g. 60,120,160")

    def replace(self, **overrides) -> Recipe:
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(name, overrides[name], "unknown recipe field")
        return dataclasses.replace(self, **overrides)

    def fields_for(self, role: str) -> dict:
        """The fields a run of ``role`` depends on: a student's add the distillation
        settings, a joint model's its gradient scale; a teacher's never hold them."""
        d = {
            f.name: getattr(self, f.name) for f in fields(self)
        }  # scalars and tuples: asdict's deep copy is a third of compare's work
        other = (STUDENT_FIELDS if role != "student" else ()) + (JOINT_FIELDS if role != "joint" else ())
        return {k: v for k, v in d.items() if k not in other}

    def as_params(self, role: str = "student") -> dict:
        """Flat, string-valued view for MLflow params."""
        return {
            k: (",".join(map(str, v)) if isinstance(v, tuple) else str(v)) for k, v in self.fields_for(role).items()
        }

    def digest(self, role: str = "train") -> str:
        """Digest of the fields that change the result of a run of ``role``. A mechanism
        field at kd-mlflow's own value is left out, so such a recipe keeps the digest it
        had before these fields existed and its finished runs are still found."""
        d = {k: v for k, v in self.fields_for(role).items() if k not in NEUTRAL_FIELDS}
        for name, own in {**OWN_MECHANISMS, **LATER_FIELDS}.items():
            if d.get(name) == own:
                d.pop(name)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: Recipe, role: str = "student") -> dict:
        """Fields of ``role`` whose value here differs from ``other``'s."""
        mine, theirs = self.fields_for(role), other.fields_for(role)
        return {k: v for k, v in mine.items() if k not in NEUTRAL_FIELDS and theirs.get(k) != v}


# kd-mlflow's own mechanisms, kept by every preset but seed-report (so their results do
# not change) and assumed for runs logged before these fields existed.
OWN_MECHANISMS: dict[str, Any] = dict(
    split_style="head",
    order_style="randperm",
    init_style="direct",
    resize="float",
    distill_loss="kl",
    student_init_skip=0,
)

# Fields added after runs existed, with their defaults: at the default a field is left out
# of the digest, so every earlier recipe keeps its hash (and its finished runs are found).
LATER_FIELDS = dict(milestones=(), gamma=0.1, teacher_target="output", joint_grad="mean")
# Tuple fields of integers (the others hold floats: mean, std).
INT_TUPLES = ("milestones",)

PRESETS: dict[str, Recipe] = {
    # The public report's recipe: its split, batch order, initialisation, pixels,
    # fp32 and loss (docs/fidelity.md; tests/test_fidelity.py).
    "seed-report": Recipe(),
    # A modern CIFAR recipe: ~95% on canonical CIFAR-10 in 100 epochs on a GPU.
    "standard": Recipe(
        **OWN_MECHANISMS,
        precision="auto",
        model="resnet18-cifar",
        image_size=32,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        augment=True,
        temperature=4.0,
        alpha=0.9,
    ),
    # The whole 11-training study on a 2-core CPU in under 30 minutes (CIFAR-10 JPEG copy).
    "cpu-demo": Recipe(
        **OWN_MECHANISMS,
        precision="auto",
        dataset="folder",
        model="resnet18-cifar",
        width=16,
        image_size=32,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        optimizer="adam",
        lr=2e-3,
        schedule="onecycle",
        batch_size=128,
        epochs=4,
        val_size=2000,
        train_subset=10000,
    ),
    # The report's regime on a 2-core CPU: networks that fit their training set (on the
    # CIFAR-10 JPEG copy the five teachers ended at 99.1-99.8% training accuracy); the
    # test set is evaluated once per run, on the selected weights, not every epoch; the
    # whole study took 14 minutes here in bf16 (README, "A measured study").
    "cpu-converge": Recipe(
        **OWN_MECHANISMS,
        precision="auto",
        dataset="folder",
        model="resnet18-cifar",
        width=16,
        image_size=32,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        optimizer="adam",
        lr=2e-3,
        schedule="onecycle",
        batch_size=128,
        epochs=12,
        val_size=1000,
        train_subset=5000,
        test_each_epoch=False,
    ),
    # Seconds, for tests: sklearn's bundled 8x8 digits, a very narrow network.
    "smoke": Recipe(
        **OWN_MECHANISMS,
        precision="auto",
        dataset="digits",
        model="resnet18-cifar",
        width=4,
        image_size=8,
        optimizer="adam",
        lr=1e-2,
        batch_size=64,
        epochs=2,
        val_size=200,
        eval_batch_size=1024,
    ),
    # Zagoruyko and Komodakis' CIFAR recipe for WRN-28-10 (the network of Allen-Zhu and
    # Li's table): SGD with Nesterov momentum, lr 0.1 x 0.2 at epochs 60, 120 and 160,
    # 200 epochs, crop and flip. Distillation settings as `standard`'s.
    "wrn-paper": Recipe(
        **OWN_MECHANISMS,
        precision="auto",
        model="wrn-28-10",
        image_size=32,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="multistep",
        milestones=(60, 120, 160),
        gamma=0.2,
        batch_size=128,
        epochs=200,
        augment=True,
        temperature=4.0,
        alpha=0.9,
    ),
    # The CIFAR-100 KD benchmarks' recipe (RepDistiller, mdistiller): resnet56 teachers,
    # a resnet20 KD student (STUDY_STUDENT_MODEL), SGD lr 0.05 (no Nesterov), weight
    # decay 5e-4, batch 64, 240 epochs, lr x 0.1 at 150, 180 and 210; T = 4, 0.9 on the
    # T^2 KL term and 0.1 on the labels. Unlike them, 5,000 training images are held out
    # for model selection (they select on the test set).
    "kd-pairs": Recipe(
        **OWN_MECHANISMS,
        precision="auto",
        dataset="cifar100",
        model="resnet56",
        image_size=32,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        nesterov=False,
        weight_decay=5e-4,
        schedule="multistep",
        milestones=(150, 180, 210),
        gamma=0.1,
        batch_size=64,
        epochs=240,
        augment=True,
        temperature=4.0,
        alpha=0.9,
    ),
    # kd-pairs' pair at CPU size, on the CIFAR-10 JPEG copy: resnet20 teachers, a resnet8
    # KD student, the same optimiser and multistep shape (milestones at 5/8, 6/8 and 7/8
    # of training) over 8 epochs on 5,000 images, as many image passes per network as
    # cpu-converge; no augmentation, so each teacher's outputs are computed once.
    "cpu-pairs": Recipe(
        **OWN_MECHANISMS,
        precision="auto",
        dataset="folder",
        model="resnet20",
        image_size=32,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        nesterov=False,
        weight_decay=5e-4,
        schedule="multistep",
        milestones=(5, 6, 7),
        gamma=0.1,
        batch_size=64,
        epochs=8,
        val_size=1000,
        train_subset=5000,
        test_each_epoch=False,
        temperature=4.0,
        alpha=0.9,
    ),
}


CHOICES["preset"] = tuple(PRESETS)

# Presets whose precision=auto becomes bf16 on a CPU that computes bfloat16 natively
# (README: measured faster there). Not smoke: the test suite's pinned numbers must not
# depend on the processor it runs on (and at 8 px, width 4, bf16 saves nothing).
CPU_BF16_PRESETS = ("cpu-demo", "cpu-converge", "cpu-pairs")


def cpu_precision(preset_name: str, recipe: Recipe, native_bf16: bool) -> Recipe:
    """The recipe a CPU run of ``preset_name`` records: precision=auto becomes bf16 on a
    CPU with native bf16, for the CPU presets, so the run's identity, group and label
    ("precision=bf16") say so and it never shares a mean with float32 runs. auto that
    stays float32 stays "auto": the identities of the runs made before bf16 on CPUs."""
    if recipe.precision == "auto" and native_bf16 and preset_name in CPU_BF16_PRESETS:
        return recipe.replace(precision="bf16")
    return recipe


def preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise ConfigError("preset", name, f"choose from {', '.join(PRESETS)}")
    return PRESETS[name]


# A study's teacher seeds unless told (`reproduce --seeds`, MLproject main's seeds).
STUDY_SEEDS = "0-4"

# The KD students' seeds in a study, per preset (`reproduce --kd-seeds` overrides them):
# one student everywhere, as the report trained (its KD script seeds 42), so the default
# study of every preset keeps the identity it had; --kd-seeds 100-104 measures the spread.
STUDY_KD_SEEDS = {"seed-report": "42"}
DEFAULT_STUDY_KD_SEEDS = "100"


def study_kd_seeds(preset_name: str) -> list[int]:
    return parse_seeds(STUDY_KD_SEEDS.get(preset_name, DEFAULT_STUDY_KD_SEEDS), "kd_seeds")


# The KD student's architecture in a study, per preset (`reproduce --student-model`
# overrides it); elsewhere the KD student is of its teachers' architecture.
STUDY_STUDENT_MODEL = {"kd-pairs": "resnet20", "cpu-pairs": "resnet8"}


def study_student_model(preset_name: str) -> str | None:
    return STUDY_STUDENT_MODEL.get(preset_name)


def resolve(preset_name: str, **overrides) -> Recipe:
    """The preset with every non-None override applied, checked."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return preset(preset_name).replace(**given)
    except TypeError as e:  # e.g. a tuple field given a scalar
        raise ConfigError("recipe", given, str(e)) from None


def effective_target(how: str, temperature: float, teacher_combine: str | None) -> str:
    """``how``, or ``output`` where that gives the same target: for a teacher that is one
    network (``teacher_combine`` None) all three are its softened output; for a ``prob``
    ensemble at T = 1 ``softened-members`` is its output p̄; for a ``logit`` ensemble
    ``mean-logit`` is its output. So the field joins a student's identity only where it
    changes the target (kd_mlflow.objectives.ensemble_target)."""
    same = (
        teacher_combine is None
        or (how == "softened-members" and teacher_combine == "prob" and temperature == 1)
        or (how == "mean-logit" and teacher_combine == "logit")
    )
    return "output" if same else how


def group_label(preset_name: str, recipe: Recipe, role: str) -> str:
    """The preset's name and the fields of ``role`` that differ from it, e.g.
    "smoke · epochs=1": how a group of comparable runs is headed in tables."""
    base = PRESETS.get(preset_name)
    diffs = recipe.differences(base, role) if base else {}
    return " · ".join([preset_name or "custom", *shown(diffs)])


def shown(fields: dict) -> list[str]:
    """Fields as a label shows them, sorted: ["epochs=1", "mean=0.5,0.5,0.5"]."""
    return [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in sorted(fields.items())]


def check_schedule(recipe: Recipe, n_train: int) -> None:
    """A one-cycle schedule needs a few steps in each phase (torch's OneCycleLR divides
    by the warm-up's length): refused before any run exists."""
    steps = recipe.epochs * -(-n_train // recipe.batch_size)
    if recipe.schedule == "onecycle" and min(int(recipe.warmup * steps), steps - int(recipe.warmup * steps)) < 2:
        raise ConfigError(
            "epochs",
            recipe.epochs,
            f"a onecycle schedule over {steps} step(s) is too short: "
            "train longer, on more images, or use --schedule constant",
        )


def default_cache_dir() -> Path:
    """Decoded datasets and checkpoints: $KD_MLFLOW_CACHE, else ~/.cache/kd-mlflow."""
    return Path(os.environ.get("KD_MLFLOW_CACHE") or Path.home() / ".cache" / "kd-mlflow")


def parse_seeds(text: str, name: str = "seeds") -> list[int]:
    """'0-4' or '0,1,2' or '3' -> a list of distinct non-negative ints."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise ConfigError(name, text, "expected seeds like 0-4 or 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(name, text, "expected distinct non-negative seeds")
    return seeds


def yes_no(name: str, text) -> bool:
    """A yes/no value in any spelling of YES_NO, in any case: what the CLI takes, and so
    what `mlflow run -P augment=true` may have logged."""
    try:
        return YES_NO[str(text).strip().lower()]
    except KeyError:
        raise ConfigError(name, text, "not true or false") from None


def field_value(name: str, text: str):
    """One recipe field from its logged text, as kd-mlflow wrote it ("True", "0.001") or as
    `mlflow run -P` typed it ("true", "1e-3"). The CLI reads every recipe field here."""
    default = getattr(Recipe, name)
    if isinstance(default, bool):  # before int: a bool is an int
        return yes_no(name, text)
    if isinstance(default, tuple):
        return numbers(name, text)
    if isinstance(default, (int, float)):
        return number(name, text, type(default))
    if name == "model":
        return check_model(text)
    if name in CHOICES:
        _check_choice(name, text, CHOICES[name])
    return text


def number_word(kind: type) -> str:
    """How a value of ``kind`` is named: "integer", "number", "boolean" ("" for text)."""
    return {bool: "boolean", int: "integer", float: "number"}.get(kind, "")


def number(name: str, text, kind: type = int, min=None, above=None):
    """An int or a float, finite, with an optional bound, refused in plain words ("not an
    integer", "not >= 0")."""
    try:
        value = kind(str(text).strip())
    except ValueError:
        raise ConfigError(name, text, f"not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise ConfigError(name, text, "not a finite number")
    if min is not None and not value >= min:
        raise ConfigError(name, text, f"not >= {min}")
    if above is not None and not value > above:
        raise ConfigError(name, text, f"not > {above}")
    return value


def numbers(name: str, text: str) -> tuple:
    """A tuple field: comma-separated integers (INT_TUPLES), else three numbers (mean,
    std). Empty text is no values: the milestones another schedule logged."""
    if not text:
        return ()
    ints = name in INT_TUPLES
    reason = "not comma-separated integers, e.g. 60,120,160" if ints else "not three comma-separated numbers"
    try:
        values = tuple((int if ints else float)(x) for x in str(text).split(","))
    except ValueError:
        raise ConfigError(name, text, reason) from None
    if not ints and len(values) != 3:
        raise ConfigError(name, text, reason)
    return values


def recipe_from_params(params: dict) -> Recipe:
    """Rebuild the Recipe a run logged (MLflow params are strings). A run logged before
    the mechanism fields existed ran kd-mlflow's own mechanisms: those are its values."""
    kwargs = {}
    for f in fields(Recipe):
        if f.name in params:
            kwargs[f.name] = field_value(f.name, params[f.name])
        elif f.name in OWN_MECHANISMS:
            kwargs[f.name] = OWN_MECHANISMS[f.name]
    return Recipe(**kwargs)
