"""Dataset registry: offline digits, idx files from a read-only root, ImageFolder trees and archives."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from raydd.data.datasets import DATASETS, DataNotFoundError, load_dataset, load_train_test

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def test_digits_is_offline_and_split_is_fixed():
    train, test = load_train_test("digits")
    assert train.images.shape == (1438, 1, 8, 8) and test.images.shape == (359, 1, 8, 8)
    assert train.info.num_classes == 10 and train.info.channels == 1 and not train.info.flip_ok
    assert abs(float(train.images.mean())) < 1e-4 and abs(float(train.images.std()) - 1) < 1e-3
    again, _ = load_train_test("digits")
    assert torch.equal(train.labels, again.labels) and train.fingerprint() == again.fingerprint()
    assert int(torch.bincount(train.labels).min()) == 139  # 80% of the smallest class (174 images)


def test_per_class_subset_is_balanced_and_seeded(digits):
    train, _ = digits
    sub = train.per_class(20, seed=3)
    assert torch.bincount(sub.labels).tolist() == [20] * 10
    assert torch.equal(sub.images, train.per_class(20, seed=3).images)


@pytest.mark.skipif(not (SHARED / "FashionMNIST").exists(), reason="needs ../shared/datasets")
def test_fashion_mnist_reads_from_a_read_only_root():
    test = load_dataset("fashion_mnist", "test", SHARED)
    assert test.images.shape == (10000, 1, 28, 28) and test.info.flip_ok
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.info.mean == (0.2861,)


def test_missing_files_name_where_raydd_looked(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("mnist", "train", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "--download" in message and "internet" in message
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("cifar10", "train", tmp_path / "nowhere")


def test_unknown_names_list_what_is_accepted():
    with pytest.raises(ValueError, match="unknown dataset 'svhn': accepted digits, mnist"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("digits", "val")
    assert set(DATASETS) >= {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder"}


def _write_tree(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("cat", "dog", "emu"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagefolder_tree_and_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDD_CACHE", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    _write_tree(tree)
    train = load_dataset("imagefolder", "train", tree, resolution=16)
    assert train.images.shape == (12, 3, 16, 16) and train.info.class_names == ("cat", "dog", "emu")
    archive = tmp_path / "ro" / "data.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="wrapped")
    archive.parent.chmod(0o555)  # a read-only root must work: extraction goes to the cache
    try:
        test = load_dataset("imagefolder", "test", archive.parent, resolution=16)
    finally:
        archive.parent.chmod(0o755)
    assert test.images.shape == (6, 3, 16, 16)
    assert sorted(p.name for p in archive.parent.iterdir()) == ["data.tar.gz"]
    assert test.info.mean == train.info.mean  # statistics always come from the training split


def test_cifar10_from_an_imagefolder_copy_records_jpeg(tmp_path, monkeypatch):
    """The CIFAR-10 JPEG copy (a tree, its archive, or <root>/cifar10-jpeg/) loads as cifar10: its classes,
    the published normalisation, and the provenance says the pixels were JPEG."""
    from PIL import Image

    from raydd.data.datasets import CIFAR10_CLASSES

    monkeypatch.setenv("RAYDD_CACHE", str(tmp_path / "cache"))
    tree = tmp_path / "CIFAR-10-images"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (tree / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tree / split / name / f"{i}.jpg")
    root = tmp_path / "datasets" / "cifar10-jpeg"
    root.mkdir(parents=True)
    with tarfile.open(root / "copy.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="CIFAR-10-images")
    for where in (tree, root / "copy.tar.gz", tmp_path / "datasets"):
        train = load_dataset("cifar10", "train", where)
        assert train.images.shape == (20, 3, 32, 32) and train.info.class_names == CIFAR10_CLASSES
        assert train.info.image_format == "jpeg" and train.info.to_dict()["image_format"] == "jpeg"
        assert train.info.mean == DATASETS["cifar10"].mean
        assert train.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert "image_format" not in load_dataset("digits").info.to_dict()  # the originals say nothing
    (tree / "train" / "truck").rename(tree / "train" / "lorry")
    with pytest.raises(ValueError, match="not cifar10's.*--dataset imagefolder"):
        load_dataset("cifar10", "train", tree)
    with pytest.raises(DataNotFoundError, match="holds no ImageFolder copy of cifar10"):
        load_dataset("cifar10", "train", tmp_path / "cache")


def test_an_archive_is_extracted_once_and_a_winner_s_tree_is_never_removed(tmp_path, monkeypatch):
    """Several processes may extract the same .tar.gz at once: each extracts beside the target and renames
    it into place already marked complete; one that loses the rename discards its own copy and leaves the
    winner's tree (which readers use) untouched; a tree left incomplete by a crash is replaced."""
    from raydd.data import datasets as ds

    monkeypatch.setenv("RAYDD_CACHE", str(tmp_path / "cache"))
    (tmp_path / "src" / "train" / "a").mkdir(parents=True)
    (tmp_path / "src" / "train" / "a" / "x.txt").write_text("1")
    archive = tmp_path / "copy.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src", arcname="wrap")
    tree = ds._extract(archive)
    target = tree.parent
    assert (target / ".complete").exists() and (tree / "train" / "a" / "x.txt").read_text() == "1"
    winner = (tree / "train" / "a" / "x.txt").stat().st_ino
    assert ds._extract(archive) == tree and (tree / "train" / "a" / "x.txt").stat().st_ino == winner  # reused

    (target / ".complete").unlink()  # a crash left it unmarked: extracted again and replaced
    assert ds._extract(archive) == tree and (target / ".complete").exists()
    winner = (tree / "train" / "a" / "x.txt").stat().st_ino

    def lost_the_race(src, dst):
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(ds.os, "replace", lost_the_race)
    checks = iter([False])  # the tree is seen incomplete when first checked, complete by the rename
    real_exists = ds.Path.exists
    monkeypatch.setattr(ds.Path, "exists", lambda p: (next(checks, True) if p.name == ".complete" else real_exists(p)))
    assert ds._extract(archive) == tree and (tree / "train" / "a" / "x.txt").stat().st_ino == winner
    assert not list(target.parent.glob("*.partial-*"))  # the loser's copy is gone, the winner's tree stays
