"""The model registry against the published networks and torchvision's own, the
multistep schedule against torch's MultiStepLR, packing per architecture, and the new
recipe fields' effect on earlier recipes' identity. Unit tier: no server; parameter
counts and FLOPs on the meta device (nothing allocated), forward passes at tiny widths."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from kd_mlflow import config, models, pack, steps
from kd_mlflow.cli import main
from kd_mlflow.config import ConfigError
from kd_mlflow.train import make_scheduler

# (parameters at 10 classes as printed, significant digits printed): He et al. 2016,
# table 6 (CIFAR-10); Zagoruyko and Komodakis 2016, table 5 (CIFAR-10, no dropout).
PUBLISHED = {
    "resnet20": (0.27e6, 2),
    "resnet32": (0.46e6, 2),
    "resnet44": (0.66e6, 2),
    "resnet56": (0.85e6, 2),
    "resnet110": (1.7e6, 2),
    "wrn-28-10": (36.5e6, 3),
    "wrn-16-8": (11.0e6, 3),
    "wrn-40-4": (8.9e6, 2),
}
# At CIFAR-100's 100 classes, as the CIFAR-100 KD papers' tables print them.
PUBLISHED_100 = {"wrn-16-2": (0.70e6, 2), "wrn-40-2": (2.26e6, 3), "resnet56": (0.86e6, 2), "resnet20": (0.28e6, 2)}
# The registry's torchvision networks, and the torchvision function each must equal.
TORCHVISION = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "resnet152": "resnet152",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenetv2": "mobilenet_v2",  # strides change no parameter
}


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _he_cifar_resnet(depth: int, classes: int) -> int:
    """He et al.'s CIFAR ResNet counted from the paper's description: a 3x3 conv to 16
    channels; 3 stages of n = (depth - 2) / 6 blocks of two 3x3 convs (16, 32, 64
    channels), each conv followed by batch norm (2 parameters a channel); option A
    shortcuts (no parameters); a 64 -> classes linear layer."""
    n, total, cin = (depth - 2) // 6, 3 * 9 * 16 + 2 * 16, 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += cin * c * 9 + c * c * 9 + 4 * c
            cin = c
    return total + 64 * classes + classes


def _close_to_published(count: int, published: float, digits: int) -> bool:
    """Within 1% of the printed figure, or (a figure printed with two significant digits:
    1.7M is 1.65M-1.75M) equal to it at the precision it was printed with."""
    scale = 10 ** (len(str(int(published))) - digits)
    return abs(count - published) <= 0.01 * published or round(count / scale) * scale == published


# --- the registry ------------------------------------------------------------------


def test_the_registry_and_config_name_the_same_models():
    assert list(models.REGISTRY) == list(config.MODELS)
    assert config.CHOICES["model"] == config.MODELS
    for name in ("wrn-10-1", "wrn-22-4", "wrn-28-10", "wrn-100-12"):
        assert config.check_model(name) == name
        assert models.entry(name).family.startswith("Wide ResNet")
    for bad in ("wrn-28-0", "wrn-27-10", "wrn-4-2", "resnet21", "vgg13", "wrn-28"):
        with pytest.raises(ConfigError) as e:
            config.check_model(bad)
        assert e.value.name == "model"
        with pytest.raises(ConfigError):
            models.entry(bad)
    with pytest.raises(ConfigError):
        config.Recipe(model=20)  # type: ignore[arg-type]


def test_every_entry_has_a_stem_and_an_input_size():
    for name, e in models.REGISTRY.items():
        assert e.name == name
        assert (e.stem, e.input_size) in {("imagenet", 224), ("cifar", 32)}, name


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameters_are_the_published_ones(name):
    count = models.size(name)["parameters"]
    assert _close_to_published(count, *PUBLISHED[name]), (name, count, PUBLISHED[name])


@pytest.mark.parametrize("name", sorted(PUBLISHED_100))
def test_parameters_at_100_classes_are_the_kd_benchmarks_ones(name):
    count = models.size(name, num_classes=100)["parameters"]
    assert _close_to_published(count, *PUBLISHED_100[name]), (name, count)


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 44, 56, 110])
def test_cifar_resnets_are_the_papers_layers_exactly(depth):
    assert models.size(f"resnet{depth}")["parameters"] == _he_cifar_resnet(depth, 10)
    assert models.size(f"resnet{depth}", num_classes=100)["parameters"] == _he_cifar_resnet(depth, 100)


def test_the_tolerance_is_not_loose():
    """The published-count check fails for a network one block per stage off (resnet26,
    0.37M, as resnet20; resnet104, 1.6M, as resnet110). Option B shortcuts (1x1
    convolutions, +2,752 on resnet20) pass it: the exact count above pins option A."""
    assert not _close_to_published(_he_cifar_resnet(26, 10), *PUBLISHED["resnet20"])
    assert not _close_to_published(_he_cifar_resnet(104, 10), *PUBLISHED["resnet110"])
    assert _he_cifar_resnet(20, 10) == 269_722  # as the widely used reference code prints it


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_networks_are_torchvisions_exactly(name):
    with torch.device("meta"):
        theirs = getattr(torchvision.models, TORCHVISION[name])(num_classes=10)
    assert models.size(name)["parameters"] == _params(theirs)
    # The same tensors, name for name: only the strides differ for mobilenetv2.
    with torch.device("meta"):
        mine = models.entry(name).build(64, 10, "direct")
    assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_cifar_stem_resnets_are_torchvisions_with_a_3x3_stem(name):
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)(num_classes=10)
    # 7x7x3x64 stem weights become 3x3x3x64; nothing else changes.
    assert models.size(f"{name}-cifar")["parameters"] == _params(theirs) - 49 * 3 * 64 + 9 * 3 * 64


def test_flops_are_torchvisions_documented_ones():
    """Forward FLOPs counted by torch agree with torchvision's documented GFLOPS (which
    count a multiply-add once) for its ImageNet networks at 224 px."""
    weights = {
        "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
        "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
        "mobilenet_v2": torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
    }
    for name, w in weights.items():
        ours = models.size(name, num_classes=1000)["gflops"]
        assert ours / 2 == pytest.approx(w.meta["_ops"], rel=0.01), name
    # CIFAR strides: the same network costs more at 32 px than the ImageNet strides would.
    assert models.size("mobilenetv2")["gflops"] > 10 * models.size("mobilenet_v2")["gflops"] * (32 / 224) ** 2


def test_width_scales_every_family():
    for name in ("resnet20", "wrn-16-2", "resnet18-cifar", "resnet50", "mobilenetv2"):
        full, half = models.size(name)["parameters"], models.size(name, width=32)["parameters"]
        assert half < 0.4 * full, name  # convolutions scale with width squared


@pytest.mark.parametrize("name", [*config.MODELS, "wrn-10-1"])
def test_a_forward_pass_gives_n_by_classes(name):
    e = models.entry(name)
    recipe = config.Recipe(model=name, width=8, image_size=e.input_size, init_style="direct", resize="float")
    torch.manual_seed(0)
    model = models.build(recipe, 7).eval()
    x = torch.randint(0, 256, (2, 3, e.input_size, e.input_size), dtype=torch.uint8)
    with torch.no_grad():
        assert model(x).shape == (2, 7)


@pytest.mark.parametrize(("name", "width"), [("resnet34", 64), ("resnet20", 8), ("wrn-10-2", 8), ("mobilenetv2", 8)])
def test_torchvision_fc_builds_a_1000_class_net_then_a_new_head(name, width):
    """init_style=torchvision-fc: the net's draws come first, the fresh head's last, so
    its body equals a 1000-class network's drawn from the same seed. (A torchvision
    ResNet at another width is rebuilt after its head, as resnet18's always was.)"""
    torch.manual_seed(3)
    net = models.entry(name).build(width, 7, "torchvision-fc")
    torch.manual_seed(3)
    reference = models.entry(name).build(width, 1000, "direct")
    old_head = [v for v in reference.state_dict().values() if v.shape[:1] == (1000,)]
    head = nn.Linear(old_head[0].shape[1], 7)  # drawn after the whole 1000-class network
    body = {k: v for k, v in reference.state_dict().items() if v.shape[:1] != (1000,)}
    mine = net.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in body.items())
    new_head = [v for v in mine.values() if v.shape[:1] == (7,)]
    assert len(new_head) == 2 and torch.equal(new_head[0], head.weight) and torch.equal(new_head[1], head.bias)


def _resnet18_before_the_registry(model: str, width: int, init_style: str, num_classes: int) -> ResNet:
    """models._resnet18 as it was before the registry (commit 5c37d26), kept verbatim:
    earlier runs' networks must be drawn exactly so."""
    cifar_stem = model == "resnet18-cifar"
    if init_style == "torchvision-fc":
        net = torchvision.models.resnet18()
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    else:
        net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    if width == 64 and not cifar_stem:
        return net
    if width != 64:
        net.inplanes = width
        net.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        net.bn1 = nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(BasicBlock, width, 2)
        net.layer2 = net._make_layer(BasicBlock, 2 * width, 2, stride=2)
        net.layer3 = net._make_layer(BasicBlock, 4 * width, 2, stride=2)
        net.layer4 = net._make_layer(BasicBlock, 8 * width, 2, stride=2)
        net.fc = nn.Linear(8 * width, num_classes)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


@pytest.mark.parametrize("model", ["resnet18", "resnet18-cifar"])
@pytest.mark.parametrize("width", [64, 4])
@pytest.mark.parametrize("init_style", ["torchvision-fc", "direct"])
def test_resnet18_networks_are_drawn_as_before(model, width, init_style):
    recipe = config.Recipe(model=model, width=width, init_style=init_style)
    torch.manual_seed(11)
    mine = models.build(recipe, 10, draws_before=1).net.state_dict()
    torch.manual_seed(11)
    _resnet18_before_the_registry(model, width, init_style, 10)
    before = _resnet18_before_the_registry(model, width, init_style, 10).state_dict()
    assert mine.keys() == before.keys()
    assert all(torch.equal(mine[k], before[k]) for k in before)


def test_models_command_lists_the_registry_measured():
    out = CliRunner().invoke(main, ["models", "--format", "json", "--width", "16", "--classes", "100"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["name"] for r in rows] == list(config.MODELS)
    for r in rows:
        with torch.device("meta"):  # the network the row stands for, without counting FLOPs again
            net = models.entry(r["name"]).build(16, 100, "direct")
        assert r["parameters"] == _params(net)
        assert r["gflops"] > 0 and (r["width"], r["classes"]) == (16, 100)
    # The table says what the JSON says; named networks only, any wrn-D-K too.
    named = ["resnet20", "wrn-28-10", "wrn-22-4"]
    table = CliRunner().invoke(main, ["models", "--width", "16", "--classes", "100", *named])
    assert table.exit_code == 0, table.output
    listed = [line.split()[0] for line in table.output.splitlines()[1:-1]]
    assert listed == named
    for r in rows:
        if r["name"] in listed:
            assert f"{r['name']:<16}{r['parameters']:>14,}{r['gflops']:>10.3f}" in table.output, r["name"]
    with torch.device("meta"):
        assert f"{_params(models.entry('wrn-22-4').build(16, 100, 'direct')):>14,}" in table.output
    bad = CliRunner().invoke(main, ["models", "wrn-23-4"])
    assert bad.exit_code == 2 and "wrn-23-4" in bad.output


# --- packing -----------------------------------------------------------------------


def _packs_exactly(name: str) -> bool:
    """Whether kd_mlflow.pack's packed network gives each lone network's logits, in
    train mode (batch statistics) and eval mode, at width 8 and 32 px. In float64: in
    float32 the rounding of grouped against dense kernels, amplified by train-mode batch
    norm over 4 images at 1x1 through resnet152's 50 blocks, reaches 1e-2."""
    recipe = config.Recipe(model=name, width=8, image_size=32, init_style="direct", resize="float")
    lone = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        lone.append(models.build(recipe, 5).double())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    try:
        packed = pack.pack(lone)
        for mode in (True, False):
            packed.train(mode)
            for m in lone:
                m.train(mode)
            with torch.no_grad():
                together = packed.net(x)
                alone = torch.stack([m.net(x) for m in lone])
            if together.shape != alone.shape or not torch.allclose(together, alone, atol=1e-9, rtol=1e-9):
                return False
    except (RuntimeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("name", [*config.MODELS, "wrn-10-2"])
def test_packing_is_claimed_exactly_where_it_gives_the_lone_logits(name):
    """A packable entry packs exactly; a refused one would not (so the refusal is needed)."""
    assert _packs_exactly(name) == models.entry(name).packable


def test_packing_an_unpackable_network_is_refused_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_MLFLOW_CACHE", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens: a run would fail
    with pytest.raises(ConfigError) as e:
        models.check_packable("resnet20")
    assert e.value.name == "pack" and "resnet20" in str(e.value)
    models.check_packable("wrn-28-10")
    models.check_packable("resnet18-cifar")
    out = CliRunner().invoke(
        main,
        ["train", "--seeds", "0-1", "--pack", "--preset", "smoke", "--model", "mobilenetv2"],
        catch_exceptions=False,
    )
    assert out.exit_code == 2
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and "mobilenetv2" in lines[0] and "pack" in lines[0], out.output


# --- the multistep schedule and the new fields ---------------------------------------


def test_multistep_lr_at_every_epoch_is_multisteplrs():
    recipe = config.preset("smoke").replace(
        optimizer="sgd", lr=0.1, schedule="multistep", milestones=(2, 4, 5), gamma=0.2, epochs=7
    )
    steps_per_epoch = 3
    ours = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    theirs = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    sched = make_scheduler(recipe, ours, steps_per_epoch)
    reference = torch.optim.lr_scheduler.MultiStepLR(theirs, milestones=list(recipe.milestones), gamma=recipe.gamma)
    seen = []
    for _epoch in range(recipe.epochs):
        expected = theirs.param_groups[0]["lr"]
        for _ in range(steps_per_epoch):  # every step of the epoch trains at that epoch's lr
            assert ours.param_groups[0]["lr"] == expected
            ours.step()
            sched.step()
        seen.append(expected)
        theirs.step()
        reference.step()
    assert seen == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.0008, 0.0008])


def test_multistep_fields_are_checked():
    smoke = config.preset("smoke")
    for overrides, field in (
        ({"schedule": "multistep"}, "milestones"),
        ({"milestones": (5, 3)}, "milestones"),
        ({"milestones": (0, 3)}, "milestones"),
        ({"milestones": (2.5,)}, "milestones"),
        ({"gamma": 0}, "gamma"),
    ):
        with pytest.raises(ConfigError) as e:
            smoke.replace(**overrides)
        assert e.value.name == field, overrides
    out = CliRunner().invoke(main, ["train", "--seed", "0", "--preset", "smoke", "--schedule", "multistep"])
    assert out.exit_code == 2 and "milestones" in out.output
    out = CliRunner().invoke(main, ["train", "--seed", "0", "--preset", "smoke", "--milestones", "1,x"])
    assert out.exit_code == 2 and "milestones" in out.output


# The digests every earlier preset had before milestones and gamma existed (commit
# 5c37d26): their finished runs must still be found.
DIGESTS_BEFORE = {
    "seed-report": ("13d3cdde388292ca", "f57cefa3946fb049"),
    "standard": ("05abe2f040bbc173", "f32d8242ef35de84"),
    "cpu-demo": ("f33d26e7cfa98767", "1f03721eb945d8a8"),
    "cpu-converge": ("c28b1dfeb3ea8c7e", "ddffab8d96c8b699"),
    "smoke": ("f6723e04d6acdafe", "35d202c7390f1a23"),
}


def test_new_fields_leave_earlier_recipes_their_identity():
    for name, (train, student) in DIGESTS_BEFORE.items():
        r = config.preset(name)
        assert (r.digest("train"), r.digest("student")) == (train, student), name
    smoke = config.preset("smoke")
    assert smoke.replace(gamma=0.5).digest() != smoke.digest()
    assert smoke.replace(milestones=(1,)).digest() != smoke.digest()
    new = {config.preset(n).digest() for n in ("wrn-paper", "kd-pairs", "cpu-pairs")}
    assert len(new) == 3 and not new & {d for d, _ in DIGESTS_BEFORE.values()}


def test_logged_recipes_come_back_whole():
    for name in config.PRESETS:
        r = config.preset(name)
        assert config.recipe_from_params(r.as_params()) == r, name
    # A run logged before milestones and gamma existed comes back with their defaults.
    old = {k: v for k, v in config.preset("smoke").as_params().items() if k not in ("milestones", "gamma")}
    assert config.recipe_from_params(old) == config.preset("smoke")
    assert config.recipe_from_params(config.preset("wrn-paper").as_params()).milestones == (60, 120, 160)


def test_pair_presets():
    wrn, pairs, cpu = (config.preset(n) for n in ("wrn-paper", "kd-pairs", "cpu-pairs"))
    assert (wrn.model, wrn.epochs, wrn.milestones, wrn.gamma, wrn.nesterov) == (
        "wrn-28-10",
        200,
        (60, 120, 160),
        0.2,
        True,
    )
    assert (pairs.dataset, pairs.model, pairs.lr, pairs.batch_size, pairs.epochs) == (
        "cifar100",
        "resnet56",
        0.05,
        64,
        240,
    )
    assert (pairs.milestones, pairs.gamma, pairs.temperature, pairs.weight_decay) == ((150, 180, 210), 0.1, 4.0, 5e-4)
    assert config.study_student_model("kd-pairs") == "resnet20"
    assert (cpu.model, cpu.dataset, config.study_student_model("cpu-pairs")) == ("resnet20", "folder", "resnet8")
    assert config.study_student_model("smoke") is None


# --- SD or KD -----------------------------------------------------------------------


def test_a_single_teacher_makes_sd_only_of_its_own_architecture():
    assert steps.student_method("train", ["resnet20"], "resnet20") == "sd"
    assert steps.student_method("student", ["resnet20"], "resnet20") == "sd"
    assert steps.student_method("train", ["resnet20"], "resnet8") == "kd"
    assert steps.student_method("train", ["resnet20"], "resnet20@w32") == "kd"
    assert steps.student_method("ensemble", ["resnet20", "resnet20"], "resnet20") == "kd"
    assert config.architecture("resnet20", 64) == "resnet20"
    assert config.architecture("resnet20", 16) == "resnet20@w16"


def test_the_cli_takes_any_registry_name_and_refuses_others():
    """--model (and MLflow's -P model=..., passed as --model) takes every registry name
    and any wrn-D-K; reproduce's --student-model / --student_model too. A name that is
    not one is refused with exit 2, naming it, before anything runs."""

    def run(*args):
        return CliRunner().invoke(main, list(args))

    # Accepted names get as far as the recipe's own check (no milestones for multistep).
    for cmd in (
        ["train", "--seed", "0", "--preset", "smoke", "--model", "wrn-22-4"],
        ["train", "--seed", "0", "--preset", "smoke", "--model", "mobilenetv2"],
        ["reproduce", "--preset", "smoke", "--student_model", "resnet8"],
    ):
        out = run(*cmd, "--schedule", "multistep")
        assert out.exit_code == 2 and "milestones" in out.output, (cmd, out.output)
    for cmd in (
        ["train", "--seed", "0", "--preset", "smoke", "--model", "wrn-27-10"],
        ["reproduce", "--preset", "smoke", "--student-model", "wrn-27-10"],
    ):
        out = run(*cmd)
        assert out.exit_code == 2 and "wrn-27-10" in out.output and "wrn-D-K" in out.output, (cmd, out.output)


def test_a_study_takes_its_presets_kd_student_architecture():
    from kd_mlflow import study

    plan = study.Plan("cpu-pairs", config.preset("cpu-pairs"), {}, [0, 1])
    assert (plan.student_model, plan.label) == ("resnet8", "cpu-pairs")  # the preset's own study
    other = study.Plan("cpu-pairs", config.preset("cpu-pairs"), {}, [0, 1], student_model="resnet14")
    assert other.label == "cpu-pairs · student_model=resnet14" and not other.own_recipe
    assert study.Plan("smoke", config.preset("smoke"), {}, [0, 1]).student_model is None
    # As a process (--jobs, Ray), the KD step still asks for its architecture.
    ctx = study.Context(plan, steps.Execution(), "0" * 32)
    kd, sd = (
        study.DistillStep("a" * 32, 100, "kd", "0,1", model=plan.student_model),
        study.DistillStep("a" * 32, 10, "sd", "0"),
    )
    (kd, sd), where = study.Context.from_json(ctx.to_json([kd, sd]))
    assert kd.overrides(where)["model"] == "resnet8" and "model" not in sd.overrides(where)
