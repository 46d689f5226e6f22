"""Dataset registry: every dataset is loaded into memory as normalised float32 tensors.

Sources:
- ``digits``: scikit-learn's 8x8 digits (ships inside the wheel, needs no files);
  a fixed, seeded, stratified 80/20 train/test split.
- ``mnist``, ``fashion_mnist``: the original idx ``.gz`` files, read directly (a
  read-only root such as ``../shared/datasets`` works) and md5-checked; with
  ``download=True`` torchvision fetches them into the cache directory.
- ``cifar10``, ``cifar100``: torchvision's loaders (md5-checked official files).
- ``imagefolder``: any ``ImageFolder`` tree (``<root>/<split>/<class>/*.jpg``) or a
  ``.tar.gz`` of one, resized to the chosen resolution; decoded pixels are cached
  as ``.npy`` (no pickles) in the cache directory, never inside the root.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

SPLITS = ("train", "test")
ENV_ROOT = "RAYDD_DATA"
ENV_CACHE = "RAYDD_CACHE"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    resolution: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    flip_ok: bool = True  # DSA flip is off for handwritten digits (a flipped digit is another class)
    # Where the pixels came from when not the dataset's own files: "jpeg" for an ImageFolder copy of
    # CIFAR (lossy; numbers measured on it are close to, not equal to, the originals').
    image_format: str | None = None

    def to_dict(self) -> dict:
        out = {
            "name": self.name, "channels": self.channels, "resolution": list(self.resolution),
            "num_classes": self.num_classes, "mean": list(self.mean), "std": list(self.std),
            "class_names": list(self.class_names), "flip_ok": self.flip_ok,
        }
        if self.image_format is not None:
            out["image_format"] = self.image_format
        return out


@dataclass
class ImageDataset:
    """Images (float32, normalised, [N, C, H, W]) and int64 labels of one split."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    split: str
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"images {tuple(self.images.shape)} and labels {tuple(self.labels.shape)} do not match")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> "ImageDataset":
        return replace(self, images=self.images[indices], labels=self.labels[indices])

    def class_indices(self, label: int) -> torch.Tensor:
        return torch.nonzero(self.labels == label, as_tuple=False).flatten()

    def per_class(self, limit: int, seed: int = 0) -> "ImageDataset":
        """A class-balanced subset with at most ``limit`` images per class (seeded)."""
        gen = torch.Generator().manual_seed(seed)
        keep = []
        for c in range(self.info.num_classes):
            idx = self.class_indices(c)
            keep.append(idx[torch.randperm(len(idx), generator=gen)[:limit]])
        return self.subset(torch.cat(keep).sort().values)

    def fingerprint(self) -> str:
        """Short content hash: identifies the exact data a trajectory was trained on."""
        h = hashlib.sha256()
        h.update(repr((self.info.name, self.split, tuple(self.images.shape))).encode())
        h.update(self.labels.numpy().tobytes())
        h.update(self.images[:: max(1, len(self) // 256)].numpy().tobytes())
        return h.hexdigest()[:16]


class DataNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are not where raydd looked."""


def default_root() -> Path:
    return Path(os.environ.get(ENV_ROOT, Path.home() / ".cache" / "raydd" / "data"))


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE, Path.home() / ".cache" / "raydd" / "cache"))


# --------------------------------------------------------------------------- digits
def _load_digits(split: str, root, download: bool, resolution) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # values 0..16 -> [0, 1]
    labels = bunch.target.astype(np.int64)
    test_mask = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(0)  # fixed split, identical on every machine
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test_mask[rng.permutation(idx)[: round(0.2 * len(idx))]] = True
    keep = test_mask if split == "test" else ~test_mask
    return images[keep], labels[keep], [str(d) for d in range(10)], None


# --------------------------------------------------------------------------- MNIST family
_IDX_FILES = {
    "mnist": ("MNIST", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }),
    "fashion_mnist": ("FashionMNIST", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }),
}
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"]


def _find_idx_dir(name: str, root: Path) -> Path | None:
    folder, files = _IDX_FILES[name]
    for cand in (root / folder / "raw", root / folder, root / "raw", root):
        if all((cand / f).exists() or (cand / f[:-3]).exists() for f in files):
            return cand
    return None


def _read_idx(path: Path, expected_md5: str) -> np.ndarray:
    if path.exists():
        raw = path.read_bytes()
        if hashlib.md5(raw).hexdigest() != expected_md5:
            raise ValueError(f"{path} is corrupt: md5 {hashlib.md5(raw).hexdigest()} != expected {expected_md5}")
        raw = gzip.decompress(raw)
    else:
        raw = path.with_suffix("").read_bytes()  # already extracted (torchvision's layout)
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_idx_dataset(name: str, split: str, root: Path, download: bool, resolution):
    folder, files = _IDX_FILES[name]
    where = _find_idx_dir(name, root)
    if where is None and download:
        import torchvision

        target = cache_dir() / "downloads"
        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        cls(str(target), train=True, download=True)
        cls(str(target), train=False, download=True)
        where = _find_idx_dir(name, target)
    if where is None:
        raise DataNotFoundError(
            f"{name}: the idx files ({', '.join(files)}) were not found under {root} "
            f"(looked in {root / folder / 'raw'}, {root / folder}, {root / 'raw'}, {root}); "
            f"pass --data-root to a folder holding them (e.g. ../shared/datasets) or --download (needs internet)"
        )
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(where / f"{prefix}-images-idx3-ubyte.gz", files[f"{prefix}-images-idx3-ubyte.gz"])
    labels = _read_idx(where / f"{prefix}-labels-idx1-ubyte.gz", files[f"{prefix}-labels-idx1-ubyte.gz"])
    names = [str(d) for d in range(10)] if name == "mnist" else _FASHION_CLASSES
    return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64), names, None


# --------------------------------------------------------------------------- CIFAR
CIFAR_JPEG_FOLDERS = {"cifar10": "cifar10-jpeg", "cifar100": "cifar100-jpeg"}  # under a data root


def _load_cifar(name: str, split: str, root: Path, download: bool, resolution):
    """The torchvision pickles under ``root``; else an ImageFolder copy of the same dataset (a
    ``{train,test}/<class>/`` tree, its .tar.gz, or ``<root>/cifar10-jpeg/``), whose class folders must be
    the dataset's classes. Returns (images, labels, classes, image format or None)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    base = cls.base_folder
    if not (root / base).exists() and not download:
        tree = _cifar_copy(name, root)
        if tree is None:
            raise DataNotFoundError(
                f"{name}: {root / base} does not exist and {root} holds no ImageFolder copy of {name} "
                f"({{train,test}}/<class>/ images, their .tar.gz, or {CIFAR_JPEG_FOLDERS[name]}/); pass --data-root "
                f"to one of those or --download (needs internet)")
        images, labels, classes, _ = _load_imagefolder(split, tree, False, resolution)
        expected = CIFAR10_CLASSES if name == "cifar10" else None
        if len(classes) != (10 if name == "cifar10" else 100) or (expected and tuple(classes) != expected):
            raise ValueError(f"{name}: the ImageFolder tree {tree} has classes {classes[:12]}, not {name}'s "
                             f"{list(expected) if expected else '100 classes'}: load it with --dataset imagefolder")
        return images, labels, classes, _image_format(tree / split)
    target = root if (root / base).exists() else cache_dir() / "downloads"
    ds = cls(str(target), train=split == "train", download=download)  # torchvision md5-checks the files
    images = ds.data.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return images, np.asarray(ds.targets, dtype=np.int64), list(ds.classes), None


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cifar_copy(name: str, root: Path) -> Path | None:
    """An ImageFolder tree (or archive) of ``name`` at ``root`` or in its conventional folder below it."""
    for candidate in (root / CIFAR_JPEG_FOLDERS[name], root):
        if not candidate.exists():
            continue
        try:
            tree = _imagefolder_tree(candidate)
        except DataNotFoundError:
            continue
        if all((tree / s).is_dir() for s in SPLITS):
            return tree
    return None


def _image_format(split_dir: Path) -> str:
    first = next((f for d in sorted(split_dir.iterdir()) if d.is_dir() for f in sorted(d.iterdir())), None)
    return "jpeg" if first is not None and first.suffix.lower() in (".jpg", ".jpeg") else "imagefolder"


# --------------------------------------------------------------------------- ImageFolder
def _imagefolder_tree(root: Path) -> Path:
    """The directory holding the split folders; a .tar.gz root is extracted into the cache once."""
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _extract(root)
    if root.is_dir():
        archives = sorted(root.glob("*.tar.gz")) + sorted(root.glob("*.tgz"))
        if not any((root / s).is_dir() for s in SPLITS) and len(archives) == 1:
            return _extract(archives[0])
        return root
    raise DataNotFoundError(f"imagefolder: {root} is neither a folder nor a .tar.gz archive")


def _extract(archive: Path) -> Path:
    digest = hashlib.sha256(f"{archive.resolve()}:{archive.stat().st_size}:{archive.stat().st_mtime_ns}".encode())
    target = cache_dir() / "extracted" / digest.hexdigest()[:16]
    if not (target / ".complete").exists():
        # extracted beside the target and marked complete there, then renamed into place: a reader never
        # sees a half-extracted tree, and a process that loses the race keeps the winner's tree untouched
        import shutil

        tmp = target.with_name(target.name + f".partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / ".complete").touch()
        if target.exists() and not (target / ".complete").exists():
            shutil.rmtree(target)  # left by a crashed extraction of an older raydd
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / ".complete").exists():
                raise
            shutil.rmtree(tmp)  # another process extracted it first
    # descend through single-folder wrappers (e.g. CIFAR-10-images/)
    tree = target
    while not any((tree / s).is_dir() for s in SPLITS):
        subdirs = [p for p in tree.iterdir() if p.is_dir()]
        if len(subdirs) != 1:
            break
        tree = subdirs[0]
    return tree


def _load_imagefolder(split: str, root: Path, download: bool, resolution):
    from PIL import Image

    tree = _imagefolder_tree(root)
    split_dir = tree / split
    if not split_dir.is_dir():
        raise DataNotFoundError(f"imagefolder: no '{split}' folder under {tree}; expected {tree}/{split}/<class>/*.jpg")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataNotFoundError(f"imagefolder: {split_dir} holds no class folders")
    size = resolution or (32, 32)
    key = hashlib.sha256(f"{split_dir.resolve()}:{size}:{classes}".encode()).hexdigest()[:16]
    cached = cache_dir() / "imagefolder" / f"{key}.npz"
    if cached.exists():
        with np.load(cached, allow_pickle=False) as z:
            return z["images"].astype(np.float32) / 255.0, z["labels"], classes, None
    images, labels = [], []
    for c, cls in enumerate(classes):
        for path in sorted((split_dir / cls).iterdir()):
            with Image.open(path) as im:
                im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
                images.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
            labels.append(c)
    pixels = np.stack(images)
    labels_np = np.asarray(labels, dtype=np.int64)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.stem + f".partial-{os.getpid()}.npz")
    np.savez(tmp, images=pixels, labels=labels_np)
    os.replace(tmp, cached)
    return pixels.astype(np.float32) / 255.0, labels_np, classes, None


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Source:
    loader: object  # (split, root, download, resolution) -> (images, labels, class names, image format or None)
    channels: int
    resolution: tuple[int, int]
    num_classes: int | None
    mean: tuple[float, ...] | None  # None: computed from the training split
    std: tuple[float, ...] | None
    flip_ok: bool
    needs_root: bool


DATASETS: dict[str, _Source] = {
    "digits": _Source(_load_digits, 1, (8, 8), 10, None, None, False, False),
    "mnist": _Source(lambda *a: _load_idx_dataset("mnist", *a), 1, (28, 28), 10, (0.1307,), (0.3081,), False, True),
    "fashion_mnist": _Source(lambda *a: _load_idx_dataset("fashion_mnist", *a), 1, (28, 28), 10, (0.2861,),
                             (0.3530,), True, True),
    "cifar10": _Source(lambda *a: _load_cifar("cifar10", *a), 3, (32, 32), 10, (0.4914, 0.4822, 0.4465),
                       (0.2023, 0.1994, 0.2010), True, True),
    "cifar100": _Source(lambda *a: _load_cifar("cifar100", *a), 3, (32, 32), 100, (0.5071, 0.4866, 0.4409),
                        (0.2673, 0.2564, 0.2762), True, True),
    "imagefolder": _Source(_load_imagefolder, 3, (32, 32), None, None, None, True, True),
}


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: accepted {', '.join(DATASETS)}")


def data_root_for(dataset: str, data_root: str | None) -> str | None:
    """The data root ``dataset`` is read from: None for a built-in dataset (digits), else ``data_root``."""
    check_dataset_name(dataset)
    return data_root if DATASETS[dataset].needs_root else None


def check_resolution(resolution) -> tuple[int, int]:
    """An image side (int) or (height, width), each >= 1 -> (height, width); else a one-line ValueError."""
    sides = (resolution, resolution) if isinstance(resolution, int) and not isinstance(resolution, bool) \
        else tuple(resolution) if isinstance(resolution, (tuple, list)) else ()
    if len(sides) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sides):
        raise ValueError(f"resolution={resolution!r} is invalid: expected an image side in pixels >= 1 "
                         f"(or [height, width])")
    return sides


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, *,
                 download: bool = False, resolution: int | tuple[int, int] | None = None) -> ImageDataset:
    """Load one split of a registered dataset as normalised tensors.

    ``resolution`` resizes (bilinear) after loading; ``imagefolder`` decodes
    straight to it (default 32x32).
    """
    check_dataset_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: accepted {', '.join(SPLITS)}")
    if resolution is not None:
        resolution = check_resolution(resolution)
    src = DATASETS[name]
    root_path = Path(root).expanduser() if root is not None else default_root()
    if not src.needs_root and root is not None and not root_path.exists():
        raise DataNotFoundError(f"{name}: data root {root_path} does not exist ({name} is built in and reads "
                                f"no data root: drop --data-root)")
    if src.needs_root and not root_path.exists() and not download:
        raise DataNotFoundError(f"{name}: data root {root_path} does not exist; pass --data-root "
                                f"(e.g. ../shared/datasets) or --download (needs internet)")
    images, labels, class_names, image_format = src.loader(split, root_path, download, resolution)
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if resolution is not None and tuple(tensor.shape[-2:]) != tuple(resolution):
        tensor = F.interpolate(tensor, size=resolution, mode="bilinear", align_corners=False)
    if src.mean is not None:
        mean, std = src.mean, src.std
    else:  # statistics of the training split, so train and test share them
        train = tensor if split == "train" else _train_pixels(name, root_path, download, resolution)
        mean = tuple(float(v) for v in train.mean(dim=(0, 2, 3)))
        std = tuple(float(v) for v in train.std(dim=(0, 2, 3)))
    info = DatasetInfo(
        name=name, channels=int(tensor.shape[1]), resolution=(int(tensor.shape[2]), int(tensor.shape[3])),
        num_classes=src.num_classes or len(class_names), mean=mean, std=std,
        class_names=tuple(class_names), flip_ok=src.flip_ok, image_format=image_format,
    )
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    # Standard strides, also along size-1 dims: a [N, 1, H, W] tensor with channel stride 1 passes as
    # channels-last too, which sends convolutions down oneDNN's channels-last path (heap corruption in
    # backward seen with torch 2.14.1 on CPU).
    normalised = ((tensor - m) / s).float().clone(memory_format=torch.contiguous_format)
    source = {"root": str(root_path) if src.needs_root else None, "resolution": list(info.resolution)}
    return ImageDataset(normalised, torch.from_numpy(np.ascontiguousarray(labels)), info, split, source)


def _train_pixels(name, root, download, resolution) -> torch.Tensor:
    images = DATASETS[name].loader("train", root, download, resolution)[0]
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if resolution is not None and tuple(tensor.shape[-2:]) != tuple(resolution):
        tensor = F.interpolate(tensor, size=resolution, mode="bilinear", align_corners=False)
    return tensor


def load_train_test(name: str, root=None, *, download: bool = False, resolution=None
                    ) -> tuple[ImageDataset, ImageDataset]:
    train = load_dataset(name, "train", root, download=download, resolution=resolution)
    test = load_dataset(name, "test", root, download=download, resolution=resolution)
    return train, test
