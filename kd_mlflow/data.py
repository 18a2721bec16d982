"""Datasets, the fixed split, and batches served from memory.

Images are decoded once into uint8 tensors (N, 3, H, W) and cached; every batch is
sliced from memory (on the GPU when there is one). Random crop and flip are done per
batch on uint8 pixels; resizing and normalisation belong to the model
(:class:`kd_mlflow.models.Classifier`), so training, evaluation and the logged MLflow
model all see the same preprocessing.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import waits
from .checkpoint import write_atomic
from .config import ConfigError, Recipe, default_cache_dir
from .errors import DataUnavailable, damaged_archive, one_line

DIGITS_TEST_FRACTION = 0.2  # digits has no official test set: a fixed one, seed 0
DIGITS_URI = "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits"
DIGITS_LOCATION = "sklearn.datasets.load_digits"  # bundled: no --data-dir
CIFAR_URIS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


@dataclass(frozen=True)
class Source:
    """A dataset as uint8 tensors: the official train and test sets."""

    name: str
    location: str  # where it came from (a path, or the torchvision root)
    classes: tuple
    train_x: torch.Tensor  # (N, 3, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def uri(self) -> str:
        """Where the data can be found again, for the run's dataset input."""
        if self.name == "digits":
            return DIGITS_URI
        if self.name.startswith("cifar"):
            return CIFAR_URIS[self.name]
        return Path(self.location).absolute().as_uri()


@dataclass(frozen=True)
class Split:
    train_idx: torch.Tensor  # indices into Source.train_*, in a fixed order
    val_idx: torch.Tensor
    digest: str


# --- loading -----------------------------------------------------------------


def load(dataset: str, data_dir: str | None = None, cache_dir: Path | None = None) -> Source:
    cache_dir = Path(cache_dir or default_cache_dir())
    if dataset in ("cifar10", "cifar100"):
        return _load_cifar(dataset, Path(data_dir) if data_dir else cache_dir / "torchvision")
    if dataset == "folder":
        if not data_dir:
            raise ConfigError("data_dir", data_dir, "required for dataset 'folder'")
        return _load_folder(Path(data_dir), cache_dir)
    if dataset == "digits":
        if data_dir and data_dir != DIGITS_LOCATION:
            raise ConfigError(
                "data_dir",
                data_dir,
                "dataset 'digits' is scikit-learn's bundled copy and reads no --data-dir: drop it, "
                "or choose --dataset folder or cifar10",
            )
        # Decoded once per scikit-learn version: importing sklearn.datasets costs a second.
        cached = cache_dir / "decoded" / f"digits-sklearn-{metadata.version('scikit-learn')}.pt"
        return _decoded(cached, _load_digits, "digits", DIGITS_LOCATION)
    raise ConfigError("dataset", dataset, "unknown dataset")


def _load_cifar(name: str, root: Path) -> Source:
    import torchvision.datasets as tvd

    cls: type[tvd.CIFAR10] = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    if not (root / cls.base_folder).is_dir():
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ConfigError("data_dir", str(root), f"cannot make this folder: {e.strerror or e}") from None
        _fetch_cifar(name, cls, root)

    class _Present(cls):
        # Files already on disk are read as they are (a test writes a tiny set in this
        # format); torchvision's md5 check guarded the download above.
        def _check_integrity(self):
            return all((Path(self.root) / self.base_folder / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self):
            import pickle  # CIFAR's own format; torchvision reads it the same way

            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    try:
        train, test = (_Present(str(root), train=t, download=False) for t in (True, False))
    except (RuntimeError, OSError, KeyError) as e:
        raise ConfigError("data_dir", str(root), f"not a readable {name} tree: {e}") from None
    return Source(
        name,
        str(root),
        tuple(train.classes),
        _nhwc_to_nchw(train.data),
        torch.as_tensor(train.targets),
        _nhwc_to_nchw(test.data),
        torch.as_tensor(test.targets),
    )


def _load_folder(path: Path, cache_dir: Path) -> Source:
    if not path.exists():
        raise ConfigError(
            "data_dir",
            str(path),
            "does not exist: dataset 'folder' needs an ImageFolder tree with train/ and test/, or a .tar.gz of one",
        )
    key = _file_key(path)
    make = functools.partial(_decode_folder, path, cache_dir / "unpacked" / key)
    return _decoded(cache_dir / "decoded" / f"folder-{key}.pt", make, "folder", str(path))


def _decode_folder(path: Path, unpacked: Path) -> Source:
    root = _unpack(path, unpacked) if path.is_file() else path
    train_x, train_y, classes = _decode_tree(root / "train", path)
    test_x, test_y, test_classes = _decode_tree(root / "test", path)
    if classes != test_classes:
        only = [
            f"only in {where}/: {', '.join(sorted(set(a) - set(b))[:5]) or '(none)'}"
            for where, a, b in (("train", classes, test_classes), ("test", test_classes, classes))
        ]
        raise ConfigError(
            "data_dir",
            str(path),
            f"dataset 'folder': train/ and test/ have different classes ({'; '.join(only)}); "
            "both need the same class folders",
        )
    return Source("folder", str(path), classes, train_x, train_y, test_x, test_y)


def _decoded(cached: Path, make, name: str, location: str) -> Source:
    """A decoded dataset from the cache (tensors and class names: loads with weights_only),
    or made by ``make()`` and cached, atomically: a process reading it meanwhile finds
    none, and concurrent makers write a temporary file each."""
    keys = ("train_x", "train_y", "test_x", "test_y")
    if cached.is_file():
        d = torch.load(cached, weights_only=True)
        return Source(name, location, tuple(d["classes"]), *(d[k] for k in keys))
    src = make()
    buf = io.BytesIO()
    torch.save({"classes": list(src.classes), **{k: getattr(src, k) for k in keys}}, buf)
    write_atomic(cached, buf.getvalue())  # a full disk: an OSError naming the file
    return src


def _file_key(path: Path) -> str:
    """Cache key: the archive's content, or a directory's listing with sizes and mtimes."""
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        for p in sorted(path.rglob("*")):
            st = p.stat()
            h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _unpack(archive: Path, dest: Path) -> Path:
    """``archive`` (a tar, compressed or not, or a zip) unpacked at ``dest``, once. It is
    unpacked into a temporary folder beside ``dest`` and renamed into place, so ``dest``
    exists only whole: a damaged archive, a full disk or a signal leaves nothing behind,
    and concurrent unpackers each rename theirs, the first one kept."""
    if not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)  # half of one, left by an older kd-mlflow
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
        try:
            _extract(archive, tmp)
            (tmp / ".complete").touch()
            try:
                tmp.rename(dest)
            except OSError:  # another process renamed its copy first
                if not (dest / ".complete").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename won
    # Accept an archive whose train/ and test/ sit one folder down.
    if not (dest / "train").is_dir():
        subs = [d for d in dest.iterdir() if d.is_dir() and (d / "train").is_dir()]
        if len(subs) == 1:
            return subs[0]
    return dest


def _extract(archive: Path, into: Path) -> None:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)  # member names are made safe: no absolute paths, no ..
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(into, filter="data")
    except Exception as e:
        if not damaged_archive(e):
            raise
        raise ConfigError(
            "data_dir",
            str(archive),
            f"dataset 'folder': not a readable archive, truncated or corrupt ({type(e).__name__}: {one_line(str(e))}); "
            "point --data-dir at an ImageFolder tree, or a whole .tar.gz, .tar or .zip of one",
        ) from None


def _decode_tree(root: Path, shown: Path):
    from PIL import Image

    if not root.is_dir():
        raise ConfigError("data_dir", str(shown), f"has no {root.name}/ folder")
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if not classes:
        raise ConfigError("data_dir", str(shown), f"{root.name}/ has no class folders")
    files = {c: sorted(f for f in (root / c).iterdir() if not f.name.startswith(".")) for c in classes}
    empty = [c for c in classes if not files[c]]
    if empty:
        raise ConfigError(
            "data_dir",
            str(shown),
            f"{root.name}/ has class folders without images ({', '.join(empty[:5])}"
            f"{', ...' if len(empty) > 5 else ''}): every class needs images, or remove its folder",
        )
    images, labels, size = [], [], None
    for label, cls in enumerate(classes):
        for f in files[cls]:
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB"))
            except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EIO):
                    raise
                raise ConfigError("data_dir", str(f), f"not an image PIL can read ({type(e).__name__})") from None
            if size is None:
                size = a.shape
            elif a.shape != size:
                raise ConfigError("data_dir", str(f), f"image of shape {a.shape}, expected {size}")
            images.append(a)
            labels.append(label)
    return _nhwc_to_nchw(np.stack(images)), torch.tensor(labels), classes


def _fetch_cifar(name: str, cls, root: Path) -> None:
    """The canonical archive, downloaded into ``root`` and unpacked, its md5 checked. A
    wait with a voice (progress every 10 s) and a bound per stall (--network-timeout); a
    failure is one line naming the dataset, what failed and what to do (exit 1)."""
    from torchvision.datasets.utils import calculate_md5, extract_archive

    archive = root / cls.filename
    part = archive.with_name(archive.name + ".part")
    advice = (
        f"check the network (and any proxy), raise --network-timeout, or point --data-dir at a folder "
        f"holding {cls.base_folder}/ (or use --dataset folder --data-dir with an ImageFolder tree or .tar.gz)"
    )
    proxy = urllib.request.getproxies().get(cls.url.split(":", 1)[0])
    via = f" via proxy {proxy}" if proxy else ""
    moved, total = 0, None

    def progress() -> str:
        return f"{moved / 1e6:.1f}" + (f" of {total / 1e6:.1f}" if total else "") + " MB"

    try:
        with waits.waiting(f"the download of {name} from {cls.url}{via}", deadline=False, progress=progress) as bound:
            request = urllib.request.Request(cls.url, headers={"User-Agent": "kd-mlflow"})
            with urllib.request.urlopen(request, timeout=bound) as response, open(part, "wb") as f:
                total = response.length
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    moved += len(chunk)
    except OSError as e:  # URLError, HTTPError and socket timeouts are OSErrors
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        part.unlink(missing_ok=True)
        raise DataUnavailable(f"{name}: the download from {cls.url}{via} failed ({_why(e, bound)}); {advice}") from None
    if calculate_md5(part) != cls.tgz_md5:
        part.unlink(missing_ok=True)
        raise DataUnavailable(f"{name}: the download from {cls.url} arrived damaged (md5 mismatch); {advice}")
    part.replace(archive)
    try:
        extract_archive(str(archive), str(root))
    except Exception as e:
        if not damaged_archive(e):
            raise
        raise DataUnavailable(f"{name}: the downloaded archive {archive} does not unpack ({e}); {advice}") from None


def _why(e: OSError, bound: float) -> str:
    reason = getattr(e, "reason", e)
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return f"no answer within {bound:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    return one_line(str(reason), 160) or type(reason).__name__


def _load_digits() -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * 16).clip(0, 255).astype(np.uint8))  # 0..16 -> 0..255
    x = x[:, None].expand(-1, 3, -1, -1).contiguous()  # grey -> RGB
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = int(len(y) * DIGITS_TEST_FRACTION)
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    return Source("digits", DIGITS_LOCATION, tuple(str(c) for c in range(10)), x[train], y[train], x[test], y[test])


def _nhwc_to_nchw(a) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()


# --- the split ---------------------------------------------------------------


def make_split(source: Source, recipe: Recipe) -> Split:
    """Train/val indices from the split seed alone, identical for every model seed.

    One permutation of the training set from ``split_seed``; ``split_style``
    "random_split" takes validation from its tail, as ``torch.utils.data.random_split(
    data, [n - val_size, val_size], generator)`` does, "head" from its head.
    """
    n = len(source.train_y)
    if recipe.val_size >= n:
        raise ConfigError("val_size", recipe.val_size, f"must be < {n}, the train set's size")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.split_seed))
    if recipe.split_style == "random_split":
        train_idx, val_idx = perm[: n - recipe.val_size], perm[n - recipe.val_size :]
    else:
        val_idx, train_idx = perm[: recipe.val_size], perm[recipe.val_size :]
    if recipe.train_subset:
        if recipe.train_subset > len(train_idx):
            raise ConfigError(
                "train_subset", recipe.train_subset, f"must be <= {len(train_idx)}, the images left after validation"
            )
        train_idx = train_idx[: recipe.train_subset]
    h = hashlib.sha256()
    for t in (train_idx, val_idx, source.train_y):
        h.update(t.numpy().astype(np.int64).tobytes())
    h.update(f"{source.name}:{source.num_classes}".encode())
    return Split(train_idx, val_idx, h.hexdigest()[:16])


# --- batches -----------------------------------------------------------------


@dataclass
class Batch:
    x: torch.Tensor  # uint8 (B, 3, H, W), on the device
    y: torch.Tensor  # int64 (B,)
    idx: torch.Tensor | None  # positions in the training set (for cached teacher outputs); None when evaluating


class DeviceData:
    """The split's images resident on ``device``; batches are slices of memory."""

    def __init__(self, source: Source, split: Split, device: torch.device):
        # It's faster to move uint8 once and convert per batch than to keep floats.
        def put(x, y):
            return x.to(device), y.to(device)

        self.device = device
        self.train_x, self.train_y = put(source.train_x[split.train_idx], source.train_y[split.train_idx])
        self.val_x, self.val_y = put(source.train_x[split.val_idx], source.train_y[split.val_idx])
        self.test_x, self.test_y = put(source.test_x, source.test_y)

    @property
    def n_train(self) -> int:
        return len(self.train_y)

    def train_batches(self, recipe: Recipe, order: torch.Generator):
        """One epoch of ``recipe``'s batches (its ``batch_size``, ``order_style``,
        ``augment`` and ``crop_padding``; nothing else decides them) in the order drawn
        from ``order``: a CPU generator, so it is the same on every device and its state
        can be checkpointed."""
        for idx in epoch_order(self.n_train, recipe.batch_size, order, recipe.order_style):
            shifts = flips = torch.empty(0)
            if recipe.augment:
                shifts = torch.randint(0, 2 * recipe.crop_padding + 1, (len(idx), 2), generator=order)
                flips = torch.rand(len(idx), generator=order) < 0.5
            idx_d = idx.to(self.device, non_blocking=True)
            x = self.train_x[idx_d]
            if recipe.augment:
                x = crop_flip(x, shifts.to(self.device), flips.to(self.device), recipe.crop_padding)
            yield Batch(x, self.train_y[idx_d], idx_d)

    def eval_batches(self, which: str, batch_size: int):
        if which not in ("val", "test"):
            raise ValueError(f"which must be 'val' or 'test', got {which!r}")
        x, y = (self.val_x, self.val_y) if which == "val" else (self.test_x, self.test_y)
        for start in range(0, len(y), batch_size):
            yield Batch(x[start : start + batch_size], y[start : start + batch_size], None)


def epoch_order(n: int, batch_size: int, order: torch.Generator, style: str):
    """One epoch's batches of positions in 0..n-1, drawn from ``order`` alone.

    "dataloader": the positions ``DataLoader(range(n), batch_size, shuffle=True,
    generator=order)`` yields in one ``for`` loop. It is that DataLoader, run over
    positions only (the images stay on the device), so each epoch draws from ``order``
    exactly what the report's loop drew: the iterator's base seed, then the sampler's
    permutation. "randperm": one ``randperm`` per epoch (kd-mlflow's own).
    """
    if style == "dataloader":
        yield from DataLoader(range(n), batch_size=batch_size, shuffle=True, generator=order)  # type: ignore[arg-type]
        return
    perm = torch.randperm(n, generator=order)
    for start in range(0, n, batch_size):
        yield perm[start : start + batch_size]


def crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int):
    """Random crop after zero padding by ``pad``, and horizontal flip, per image, as one
    gather on the device (no per-image Python)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (shifts[:, 0:1] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = shifts[:, 1:2] + torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows,
        cols,
    ]
