"""raydd import / raydd export, through the command line: every format in, parquet out, malformed files."""
from __future__ import annotations

import pickle

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from raydd.cli import main
from raydd.interchange import card_record, export_set, import_set
from raydd.methods.synthetic import SyntheticSet, load_synthetic


def a_set(digits, soft: bool = False) -> SyntheticSet:
    train, _ = digits
    idx = torch.cat([train.class_indices(c)[:2] for c in range(10)])
    labels = train.labels[idx]
    if soft:
        labels = torch.softmax(torch.randn(len(idx), 10, generator=torch.Generator().manual_seed(0)), 1)
    return SyntheticSet(images=train.images[idx].clone(), labels=labels, dataset={**train.info.to_dict(), "zca": False},
                        method="dm", config={"ipc": 2, "lr_img": 1.0}, syn_lr=0.01, iteration=7,
                        meta={"seed": 3, "store": "somewhere"})


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("soft", [False, True])
def test_export_then_import_gives_the_same_tensors_and_metadata(digits, tmp_path, capsys, soft):
    original = a_set(digits, soft)
    original.save(tmp_path / "set.safetensors")
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text('{"setting": "dm_digits_ipc2", "acc_mean": 0.81, "acc_std": 0.02, '
                      '"eval": {"protocol": "standard", "num_models": 5}}\n')
    code, out, err = run(capsys, "export", str(tmp_path / "set.safetensors"), str(tmp_path / "hf"),
                         "--ledger", str(ledger), "--setting", "dm_digits_ipc2")
    assert code == 0, err
    table = pq.read_table(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    assert {"image", "label", "raydd_normalised"} <= set(table.column_names)
    assert ("soft_label" in table.column_names) == soft
    card = (tmp_path / "hf" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])  # the YAML front matter the Hub reads
    assert front["configs"][0]["data_files"][0]["path"] == "data/train-*"
    assert "81.00 ± 2.00 % (standard protocol, 5 networks)" in card
    assert card_record(tmp_path / "hf")["ledger_row"]["setting"] == "dm_digits_ipc2"
    code, out, err = run(capsys, "import", str(tmp_path / "hf"), "--dataset", "digits", "--out",
                         str(tmp_path / "back.safetensors"))
    assert code == 0, err
    back = load_synthetic(tmp_path / "back.safetensors")
    assert torch.equal(back.images, original.images) and torch.equal(back.labels, original.labels)
    assert (back.method, back.config, back.syn_lr, back.iteration, back.dataset) == \
        (original.method, original.config, original.syn_lr, original.iteration, original.dataset)
    assert {k: v for k, v in back.meta.items() if k != "imported"} == original.meta
    assert back.meta["imported"]["format"] == "parquet"


def test_png_column_alone_decodes_to_the_8_bit_images(digits, tmp_path):
    """A parquet folder with image + label only (as NCFM and RethinkDC release): the PNGs are decoded."""
    original = a_set(digits)
    export_set(original, tmp_path / "hf")
    path = tmp_path / "hf" / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pq.read_table(path).drop(["raydd_normalised"]), path)
    (tmp_path / "hf" / "README.md").unlink()
    back = import_set(tmp_path / "hf", "digits")
    assert back.meta["imported"]["pixels"] == "decoded PNG/JPEG" and torch.equal(back.labels, original.labels)
    step = 1 / 255 / min(original.dataset["std"])  # one 8-bit level in normalised units
    assert float((back.pixels() - original.pixels().clamp(0, 1)).abs().max()) <= 0.5 / 255 + 1e-6
    assert float((back.images - original.images).abs().max()) < step


@pytest.mark.parametrize("logits", [False, True])
def test_mtt_tensors_with_weights_only(digits, tmp_path, capsys, logits):
    original = a_set(digits)
    folder = tmp_path / "logged_files"
    folder.mkdir()
    torch.save(original.images, folder / "images_best.pt")
    labels = torch.randn(len(original), 10) if logits else original.labels
    torch.save(labels, folder / "labels_best.pt")
    torch.save(torch.tensor(0.0123), folder / "lr_best.pt")
    code, out, err = run(capsys, "import", str(folder), "--dataset", "digits", "--out", str(tmp_path / "s.safetensors"))
    assert code == 0, err
    back = load_synthetic(tmp_path / "s.safetensors")
    assert torch.equal(back.images, original.images) and back.syn_lr == pytest.approx(0.0123)
    if logits:  # DATM's learned logits become probability rows
        assert torch.allclose(back.labels, torch.softmax(labels, 1)) and back.meta["imported"]["labels"] == \
            "logit rows, softmaxed"
    else:
        assert torch.equal(back.labels, original.labels)


def test_image_folder(digits, tmp_path, capsys):
    original = a_set(digits)
    pixels = original.pixels().clamp(0, 1)
    for i, (img, y) in enumerate(zip(pixels, original.labels.tolist())):
        (tmp_path / "set" / f"class{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0] * 255).round().byte().numpy()).save(tmp_path / "set" / f"class{y}" / f"{i}.png")
    code, out, err = run(capsys, "import", str(tmp_path / "set"), "--dataset", "digits", "--format", "imagefolder",
                         "--out", str(tmp_path / "s.safetensors"))
    assert code == 0, err
    back = load_synthetic(tmp_path / "s.safetensors")
    assert sorted(back.labels.tolist()) == sorted(original.labels.tolist()) and back.images.shape == original.images.shape


def malformed(tmp_path, digits):
    """(name, files to write, CLI arguments, the one line expected)."""
    def pickled(folder):
        folder.mkdir()
        with open(folder / "images_best.pt", "wb") as f:
            pickle.dump({"not": "a tensor"}, f)
        torch.save(torch.zeros(2, dtype=torch.int64), folder / "labels_best.pt")

    def dict_tensor(folder):
        folder.mkdir()
        torch.save({"images": torch.zeros(2, 1, 8, 8)}, folder / "images_best.pt")
        torch.save(torch.zeros(2, dtype=torch.int64), folder / "labels_best.pt")

    def wrong_shape(folder):
        folder.mkdir()
        torch.save(torch.zeros(2, 3, 32, 32), folder / "images_best.pt")
        torch.save(torch.zeros(2, dtype=torch.int64), folder / "labels_best.pt")

    def bad_labels(folder):
        folder.mkdir()
        torch.save(torch.zeros(2, 1, 8, 8), folder / "images_best.pt")
        torch.save(torch.tensor([0, 12]), folder / "labels_best.pt")

    def no_labels(folder):
        folder.mkdir()
        torch.save(torch.zeros(2, 1, 8, 8), folder / "images_best.pt")

    def not_parquet(folder):
        folder.mkdir()
        (folder / "train.parquet").write_bytes(b"PAR1 but not really")

    def no_label_column(folder):
        export_set(a_set(digits), folder)
        path = folder / "data" / "train-00000-of-00001.parquet"
        pq.write_table(pq.read_table(path).drop(["label"]), path)

    def not_an_image(folder):
        (folder / "3").mkdir(parents=True)
        for c in range(10):
            (folder / str(c)).mkdir(exist_ok=True)
        (folder / "3" / "x.png").write_bytes(b"no png here")

    return [
        ("a pickle", pickled, [], "images_best.pt: not a tensor file torch.load(weights_only=True) can read"),
        ("a dict", dict_tensor, [], "images_best.pt: holds a dict, expected one tensor"),
        ("wrong shape", wrong_shape, [], "images of shape (2, 3, 32, 32), expected [N, 1, 8, 8] for digits"),
        ("bad labels", bad_labels, [], "labels_best.pt: 2 class ids in [0, 12], expected 2 ids in [0, 9]"),
        ("no labels", no_labels, [], "images_best.pt has no labels_best.pt beside it"),
        ("not parquet", not_parquet, [], "train.parquet: not a parquet file"),
        ("no label column", no_label_column, [], "no label column"),
        ("not an image", not_an_image, ["--format", "imagefolder"], "x.png: not a PNG/JPEG image"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_malformed_files_are_one_line(digits, tmp_path, capsys, case):
    name, write, extra, expected = malformed(tmp_path, digits)[case]
    write(tmp_path / "src")
    code, out, err = run(capsys, "import", str(tmp_path / "src"), "--dataset", "digits", *extra,
                         "--out", str(tmp_path / "s.safetensors"))
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (name, err)
    assert not (tmp_path / "s.safetensors").exists()


def test_export_refuses_an_existing_folder_and_a_missing_ledger_row(digits, tmp_path, capsys):
    a_set(digits).save(tmp_path / "set.safetensors")
    (tmp_path / "taken").mkdir()
    code, _, err = run(capsys, "export", str(tmp_path / "set.safetensors"), str(tmp_path / "taken"))
    assert code == 2 and "taken exists: export writes a new folder" in err
    (tmp_path / "ledger.jsonl").write_text('{"setting": "other"}\n')
    code, _, err = run(capsys, "export", str(tmp_path / "set.safetensors"), str(tmp_path / "new"), "--ledger",
                       str(tmp_path / "ledger.jsonl"), "--setting", "dm_digits_ipc2")
    assert code == 2 and "has no row of setting 'dm_digits_ipc2'" in err and not (tmp_path / "new").exists()
