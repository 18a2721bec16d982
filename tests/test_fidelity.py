"""seed-report is the report's recipe, shown against torch and torchvision themselves:
the split (random_split), the batch order (DataLoader with a seeded generator), the
initial weights (torchvision's resnet18 with its fc replaced), the pixels (PIL's
Resize(224) + ToTensor + Normalize), the distillation loss, and a few training steps
side by side with a reference written from the report's code. No MLflow.

The report's facts, as this file uses them:
- train, val = random_split(CIFAR10(train=True), [45000, 5000], generator=Generator().manual_seed(42))
- DataLoader(train, batch_size=128, shuffle=True, generator=Generator().manual_seed(42))
- seed_everything(s); model = resnet18(); model.fc = nn.Linear(512, 10)   (SD: twice)
- Compose([Resize(224), ToTensor(), Normalize((0.5,) * 3, (0.5,) * 3)]) on PIL images
- Adam(lr=1e-3), fp32, cross-entropy; distillation: target = mean of the teachers'
  softmax, loss = -(target * log(clamp(softmax(student), 1e-9, 1 - 1e-9))).sum(1).mean()
"""

from __future__ import annotations

import contextlib
import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision import transforms

from kd_mlflow import config, data, machine, models, objectives, train
from kd_mlflow.ensemble import Ensemble
from kd_mlflow.objectives import CrossEntropy, OnlineTeacher
from kd_mlflow.train import fit, make_runtime

JPEG_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
REPORT = config.preset("seed-report")


def seed_everything(seed: int) -> None:
    """The report's seeding."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    random.seed(seed)
    np.random.seed(seed)


def report_resnet18() -> nn.Module:
    model = torchvision.models.resnet18()
    model.fc = nn.Linear(512, 10)
    return model


def report_transform():
    return transforms.Compose(
        [transforms.Resize(224), transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)]
    )


def _source(train_x, train_y, test_x=None, test_y=None) -> data.Source:
    test_x = train_x[:2] if test_x is None else test_x
    test_y = train_y[:2] if test_y is None else test_y
    return data.Source("memory", "memory", tuple(str(c) for c in range(10)), train_x, train_y, test_x, test_y)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """The shared archive's images where it is present, else a synthetic archive's."""
    archive = JPEG_ARCHIVE if JPEG_ARCHIVE.is_file() else synthetic_archive(tmp_path_factory.mktemp("jpegs"))
    return read_jpegs(archive)


def synthetic_archive(folder: Path) -> Path:
    """A stand-in for the shared archive in its layout (train/<class>/NNNN.jpg, 10
    classes, JPEG quality 75 as its copy was encoded): 26 random 32x32 RGB images per
    class, seeded. The tests that read it compare two pipelines on the same pixels, so
    any pixels serve; random ones use every grey level."""
    rng = np.random.default_rng(0)
    path = folder / "cifar10-jpeg.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for cls in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
            for i in range(26):
                jpeg = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, "JPEG", quality=75)
                info = tarfile.TarInfo(f"train/{cls}/{i:04d}.jpg")
                info.size = jpeg.tell()
                jpeg.seek(0)
                tar.addfile(info, jpeg)
    return path


def read_jpegs(archive: Path):
    """256 training images of ``archive`` (the CIFAR-10 JPEG copy's layout), 25 or 26 per
    class, as uint8 (N, 32, 32, 3) arrays read straight out of it, and their labels."""
    per_class: dict[str, list] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] != "train":
                continue
            got = per_class.setdefault(parts[1], [])
            if len(got) < 26:
                with Image.open(tar.extractfile(member)) as im:
                    got.append(np.asarray(im.convert("RGB")))
            if len(per_class) == 10 and all(len(v) == 26 for v in per_class.values()):
                break
    images, labels = [], []
    for label, cls in enumerate(sorted(per_class)):
        images += per_class[cls]
        labels += [label] * len(per_class[cls])
    return np.stack(images[:256]), np.array(labels[:256])


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# --- the split and the batch order ---------------------------------------------

N_CIFAR_TRAIN = 50_000


def _cifar_sized_source() -> data.Source:
    # Pixels do not matter here, only positions: 1x1 images keep it small.
    return _source(torch.zeros(N_CIFAR_TRAIN, 3, 1, 1, dtype=torch.uint8), torch.zeros(N_CIFAR_TRAIN, dtype=torch.long))


def _report_split():
    return random_split(range(N_CIFAR_TRAIN), [45_000, 5_000], generator=torch.Generator().manual_seed(42))


def test_split_is_random_splits():
    split = data.make_split(_cifar_sized_source(), REPORT)
    train_data, val_data = _report_split()
    assert split.train_idx.tolist() == list(train_data.indices)
    assert split.val_idx.tolist() == list(val_data.indices)
    # kd-mlflow's own split (other presets) takes validation from the head instead.
    head = data.make_split(_cifar_sized_source(), REPORT.replace(split_style="head"))
    assert head.val_idx.tolist() != list(val_data.indices)


def test_batch_order_is_the_dataloaders_epoch_by_epoch():
    src = _cifar_sized_source()
    split = data.make_split(src, REPORT)
    dd = data.DeviceData(src, split, torch.device("cpu"))
    order = torch.Generator().manual_seed(REPORT.order_seed)
    ours, states = [], []
    for _ in range(3):
        states.append(order.get_state())
        # Positions in kd-mlflow's training set, mapped to CIFAR-10 indices.
        ours.append([split.train_idx[b.idx].tolist() for b in dd.train_batches(REPORT, order)])

    train_data, _ = _report_split()  # its items are CIFAR-10 indices
    loader = DataLoader(train_data, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(42))
    theirs = []
    for _ in range(3):
        theirs.append([batch.tolist() for batch in loader])

    assert [len(b) for b in ours[0]] == [128] * 351 + [72]
    assert ours == theirs
    assert ours[0] != ours[1]
    # Resume: an epoch's order is a function of the generator's state alone.
    resumed = torch.Generator()
    resumed.set_state(states[2])
    again = [split.train_idx[b.idx].tolist() for b in dd.train_batches(REPORT, resumed)]
    assert again == theirs[2]


# --- initialisation ----------------------------------------------------------------


def _assert_same_state(ours: dict, theirs: dict):
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


@pytest.mark.parametrize("seed", [0, 13])
def test_initial_weights_are_torchvisions_resnet18_with_a_new_fc(seed):
    seed_everything(seed)
    reference = report_resnet18().state_dict()
    torch.manual_seed(seed)  # what the training step does
    _assert_same_state(models.build(REPORT, 10).net.state_dict(), reference)

    # KD: the report's KD script builds its student first.
    torch.manual_seed(seed)
    kd = models.build(REPORT, 10, draws_before=models.draws_before_student(REPORT, "kd"))
    _assert_same_state(kd.net.state_dict(), reference)

    # SD: a throw-away network for the teacher (then overwritten by its file), then the student.
    seed_everything(seed)
    report_resnet18()
    sd_reference = report_resnet18().state_dict()
    torch.manual_seed(seed)
    sd = models.build(REPORT, 10, draws_before=models.draws_before_student(REPORT, "sd"))
    _assert_same_state(sd.net.state_dict(), sd_reference)


# --- pixels -----------------------------------------------------------------------


def test_pixels_are_pils_resize_totensor_normalize(jpegs):
    images, _ = jpegs
    images = images[::16]  # 16 images, all classes
    model = models.build(REPORT, 10)
    ours = model.preprocess(_nchw(images))
    theirs = torch.stack([report_transform()(Image.fromarray(a)) for a in images])
    assert ours.shape == theirs.shape == (16, 3, 224, 224)
    grey_level = (1 / 255) / 0.5  # one grey level, after Normalize's division by std
    assert (ours - theirs).abs().max().item() <= grey_level + 1e-6
    # Rounding after each pass, as PIL stores its passes, makes it exact here.
    assert torch.equal(ours, theirs)


# --- the distillation loss --------------------------------------------------------


def test_distillation_loss_has_the_reports_gradients():
    g = torch.Generator().manual_seed(0)
    teachers = [torch.randn(6, 10, generator=g) * 8 for _ in range(3)]
    # Confident students: many probabilities below 1e-9, where the clamp acts.
    student = (torch.randn(6, 10, generator=g) * 20).requires_grad_()
    batch = data.Batch(torch.zeros(6, 3, 1, 1), torch.zeros(6, dtype=torch.long), None)

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits

    teacher = OnlineTeacher(Ensemble([Fixed(t) for t in teachers]), contextlib.nullcontext)

    def grad_of(loss):
        student.grad = None
        loss.backward()
        return student.grad.clone()

    target = torch.stack([t.softmax(1) for t in teachers]).mean(0)
    report_loss = -(target * torch.log(torch.clamp(student.softmax(1), 1e-9, 1 - 1e-9))).sum(1).mean()
    ours = objectives.objective_for(REPORT, teacher)(student, batch)
    assert ours.item() == pytest.approx(report_loss.item(), rel=1e-5)
    g_report, g_ours = grad_of(report_loss), grad_of(ours)
    assert torch.allclose(g_ours, g_report, atol=1e-6, rtol=1e-5)
    # Hinton's KL (the other presets' loss) has other gradients where the clamp acts.
    g_kl = grad_of(objectives.objective_for(REPORT.replace(distill_loss="kl"), teacher)(student, batch))
    assert not torch.allclose(g_kl, g_report, atol=1e-4)


# --- what else a run's numbers depend on --------------------------------------------


def test_env_tags_name_the_machine_and_libraries():
    tags = machine.env_tags("cpu")
    for name in (
        "cpu",
        "cpu_capability",
        "torch",
        "cuda",
        "cudnn",
        "gpu",
        "tf32_matmul",
        "tf32_cudnn",
        "threads",
        "machine",
    ):
        assert isinstance(tags[f"kd.env.{name}"], str) and tags[f"kd.env.{name}"], name
    assert tags["kd.env.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert tags["kd.env.torch"] == torch.__version__
    assert tags["kd.env.threads"] == str(torch.get_num_threads())
    assert tags["kd.env.gpu"] == "none"


def test_cpu_model_reads_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU @ 3.00GHz\nflags\t: avx\n")
    assert machine.cpu_model(info) == "Example CPU @ 3.00GHz"
    assert machine.cpu_model(tmp_path / "missing")  # falls back to the platform's word


def test_seed_report_is_fp32_and_keeps_pytorchs_tf32_defaults(torch_defaults):
    assert make_runtime(REPORT, "cpu").precision == "fp32"
    assert make_runtime(REPORT.replace(precision="bf16"), "cpu").precision == "bf16"
    # What a fresh process has: this session's switches before any test ran (conftest
    # puts them back after each test, so no earlier test changes what is read here).
    defaults = {"matmul": torch_defaults["tf32_matmul"], "cudnn": torch_defaults["tf32_cudnn"]}
    live = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    assert train.tf32_switches(REPORT.precision) == defaults == live == {"matmul": False, "cudnn": True}
    assert train.tf32_switches("bf16")["matmul"] is True


# --- side by side -------------------------------------------------------------------


class _PILImages(Dataset):
    """The report's dataset: PIL images, transformed on access."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class _Stop(Exception):
    pass


STEPS, BATCH, VAL, SEED = 4, 16, 56, 3


def _report_losses(images, labels) -> list[float]:
    seed_everything(SEED)
    dataset = _PILImages(images, labels, report_transform())
    train_data, _ = random_split(dataset, [len(dataset) - VAL, VAL], generator=torch.Generator().manual_seed(42))
    loader = DataLoader(train_data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(42))
    model = report_resnet18()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    losses = []
    model.train()
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if len(losses) == STEPS:
            return losses
    return losses


def _kd_mlflow_losses(images, labels) -> list[float]:
    recipe = REPORT.replace(batch_size=BATCH, val_size=VAL)
    src = _source(_nchw(images), torch.from_numpy(labels))
    rt = make_runtime(recipe, "cpu")
    split = data.make_split(src, recipe)
    dd = data.DeviceData(src, split, rt.device)
    torch.manual_seed(SEED)
    model = rt.prepare(models.build(recipe, src.num_classes))
    losses = []

    def on_step(loss):
        losses.append(loss.item())
        if len(losses) == STEPS:
            raise _Stop

    with pytest.raises(_Stop):
        fit(model, [CrossEntropy()], dd, recipe, rt, log=None, on_step=on_step)
    return losses


@pytest.mark.e2e  # two whole training pipelines, side by side
def test_training_steps_match_a_reference_written_from_the_report(jpegs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, labels = jpegs
        theirs = _report_losses(images, labels)
        ours = _kd_mlflow_losses(images, labels)
    finally:
        torch.set_num_threads(threads)
    assert len(ours) == len(theirs) == STEPS
    assert ours == pytest.approx(theirs, abs=1e-4), (ours, theirs)
