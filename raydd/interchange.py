"""Anyone's distilled set in, a raydd set out: the formats the field releases.

Import (``import_set``; ``raydd import``) turns a released set into a :class:`SyntheticSet` with its
provenance in ``meta["imported"]``, ready for ``raydd evaluate`` under every protocol:

- ``tensors``: MTT/DATM-style ``images_best.pt`` / ``labels_best.pt`` / ``lr_best.pt`` in one folder (or any
  single ``images_*.pt`` with its ``labels_*.pt`` / ``lr_*.pt``), loaded with ``torch.load(weights_only=True)``
  (never an arbitrary pickle). Images are in the dataset's normalisation (those codes' convention), or in its
  ZCA space with ``zca=True`` (raydd then fits the ZCA those codes fit: eps 0.1 on the training set). Labels:
  class ids [N], or [N, K] rows: probability rows are kept, other rows (DATM's learned logits) are softmaxed.
- ``parquet``: a Hugging Face ``datasets`` parquet folder (NCFM, RethinkDC): an ``image`` column (a struct with
  PNG/JPEG ``bytes``, or raw bytes) and a ``label`` column; a ``raydd_normalised`` float column (what
  ``export_set`` writes) is read instead of the PNGs, exactly, and ``soft_label`` rows as soft labels.
- ``imagefolder``: ``ROOT/<class>/<image>`` with the classes' folder names sorted (or named by the dataset's
  class names where they match); PNG or JPEG.

Export (``export_set``; ``raydd export``) writes a parquet folder that ``datasets.load_dataset("parquet",
data_dir=...)`` reads (``data/train-00000-of-00001.parquet``: ``image`` PNG struct, ``label``, the exact
``raydd_normalised`` images and ``soft_label`` rows when soft) and a dataset card (``README.md`` with YAML front
matter) naming the method, setting, knobs, learned step size, evaluation and raydd's version; the card's
``raydd:`` block carries what ``import_set`` needs to rebuild the same set.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.datasets import DATASETS, check_dataset_name, load_dataset
from .methods.synthetic import SyntheticSet

FORMATS = ("tensors", "parquet", "imagefolder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CARD_MARKER = "raydd:"  # the card's YAML key holding the exported set's metadata (one JSON line)


class ImportFormatError(ValueError):
    """A file that is not what its format expects: the message names the file and what was expected."""


# --------------------------------------------------------------------------- dataset facts
def dataset_facts(dataset: str, data_root: str | None = None) -> dict[str, Any]:
    """``SyntheticSet.dataset`` for ``dataset``: its registered channels, resolution, classes and
    normalisation; a dataset whose statistics come from its training split (digits, imagefolder) is loaded."""
    check_dataset_name(dataset)
    src = DATASETS[dataset]
    if src.mean is not None and src.num_classes is not None:
        return {"name": dataset, "channels": src.channels, "resolution": list(src.resolution),
                "num_classes": src.num_classes, "mean": list(src.mean), "std": list(src.std),
                "class_names": [], "flip_ok": src.flip_ok, "zca": False}
    info = load_dataset(dataset, "train", data_root).info
    return {"name": dataset, "channels": info.channels, "resolution": list(info.resolution),
            "num_classes": info.num_classes, "mean": list(info.mean), "std": list(info.std),
            "class_names": list(info.class_names), "flip_ok": info.flip_ok, "zca": False}


def _normalise(pixels: torch.Tensor, facts: dict) -> torch.Tensor:
    mean = torch.tensor(facts["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(facts["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return ((pixels - mean) / std).float().contiguous()


def _check_images(images: torch.Tensor, facts: dict, where: str) -> None:
    want = (facts["channels"], *facts["resolution"])
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(want):
        raise ImportFormatError(f"{where}: images of shape {tuple(images.shape)}, expected [N, {want[0]}, {want[1]}, "
                                f"{want[2]}] for {facts['name']}")
    if not images.is_floating_point() or not bool(torch.isfinite(images).all()):
        raise ImportFormatError(f"{where}: images must be finite floating-point values")


def _labels(labels: torch.Tensor, n: int, k: int, where: str) -> tuple[torch.Tensor, str]:
    """int64 class ids [N] or float probability rows [N, K] (logit rows softmaxed), and what was done."""
    if labels.dim() == 1 and not labels.is_floating_point() and labels.dtype != torch.bool:
        if labels.shape[0] != n or (n and (int(labels.min()) < 0 or int(labels.max()) >= k)):
            raise ImportFormatError(f"{where}: {labels.shape[0]} class ids in [{int(labels.min()) if n else 0}, "
                                    f"{int(labels.max()) if n else 0}], expected {n} ids in [0, {k - 1}]")
        return labels.long(), "class ids"
    if labels.dim() == 2 and labels.is_floating_point() and tuple(labels.shape) == (n, k):
        rows = labels.float()
        if bool((rows >= 0).all()) and bool(torch.allclose(rows.sum(1), torch.ones(n), atol=1e-4)):
            return rows, "probability rows"
        return torch.softmax(rows, dim=1), "logit rows, softmaxed"
    raise ImportFormatError(f"{where}: labels of {labels.dtype} {tuple(labels.shape)}, expected {n} class ids "
                            f"(int) or [{n}, {k}] float rows")


# --------------------------------------------------------------------------- formats in
def _load_tensor(path: Path) -> torch.Tensor:
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore")
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same one-line answer
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImportFormatError(f"{path}: not a tensor file torch.load(weights_only=True) can read ({first[:160]})")
    if not isinstance(value, torch.Tensor):
        raise ImportFormatError(f"{path}: holds a {type(value).__name__}, expected one tensor")
    return value


def _pick(folder: Path, stem: str, suffix_of: str | None) -> Path | None:
    if suffix_of is not None:
        path = folder / f"{stem}_{suffix_of}.pt"
        return path if path.is_file() else None
    best = folder / f"{stem}_best.pt"
    if best.is_file():
        return best
    found = sorted(folder.glob(f"{stem}_*.pt"))
    if len(found) > 1:
        raise ImportFormatError(f"{folder}: {len(found)} {stem}_*.pt files and no {stem}_best.pt: pass one "
                                f"file's path ({', '.join(p.name for p in found[:4])})")
    return found[0] if found else None


def _read_tensors(source: Path, facts: dict) -> tuple[torch.Tensor, torch.Tensor, float | None, dict]:
    if source.is_file():  # images_X.pt named directly: its labels_X.pt and lr_X.pt beside it
        if not (source.name.startswith("images_") and source.suffix == ".pt"):
            raise ImportFormatError(f"{source}: expected an images_*.pt file or a folder holding images_best.pt")
        folder, tag = source.parent, source.stem[len("images_"):]
        images_path = source
    else:
        folder, tag = source, None
        images_path = _pick(folder, "images", None)
        if images_path is None:
            raise ImportFormatError(f"{source}: no images_best.pt or images_*.pt (MTT/DATM tensors)")
        tag = images_path.stem[len("images_"):]
    labels_path, lr_path = _pick(folder, "labels", tag), _pick(folder, "lr", tag)
    if labels_path is None:
        raise ImportFormatError(f"{folder}: {images_path.name} has no labels_{tag}.pt beside it")
    images = _load_tensor(images_path).detach().float()
    _check_images(images, facts, str(images_path))
    labels, how = _labels(_load_tensor(labels_path).detach(), images.shape[0], facts["num_classes"], str(labels_path))
    syn_lr = None
    if lr_path is not None:
        lr = _load_tensor(lr_path).detach()
        if lr.numel() != 1 or not math.isfinite(float(lr)) or float(lr) <= 0:
            raise ImportFormatError(f"{lr_path}: expected one positive learned step size, got {tuple(lr.shape)} "
                                    f"{lr.flatten()[:3].tolist()}")
        syn_lr = float(lr)
    files = [p.name for p in (images_path, labels_path, lr_path) if p is not None]
    return images, labels, syn_lr, {"files": files, "labels": how}


def _decode_image(data: bytes, facts: dict, where: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if facts["channels"] == 1 else "RGB")
            array = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as err:
        raise ImportFormatError(f"{where}: not a PNG/JPEG image ({err})") from None
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def _read_parquet(source: Path, facts: dict) -> tuple[torch.Tensor, torch.Tensor, float | None, dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [source] if source.is_file() else sorted(source.rglob("*.parquet"))
    if not files:
        raise ImportFormatError(f"{source}: no .parquet files (a Hugging Face datasets parquet folder)")
    tables = []
    for path in files:
        try:
            tables.append((path, pq.read_table(path)))
        except (pa.ArrowInvalid, OSError) as err:
            raise ImportFormatError(f"{path}: not a parquet file ({str(err)[:160]})") from None
    images, labels, soft = [], [], []
    exact = all("raydd_normalised" in t.column_names for _, t in tables)
    for path, table in tables:
        missing = [c for c in ("image", "label") if c not in table.column_names]
        if missing:
            raise ImportFormatError(f"{path}: no {' or '.join(missing)} column (columns: "
                                    f"{', '.join(table.column_names)}); expected image and label")
        labels.extend(table.column("label").to_pylist())
        if "soft_label" in table.column_names:
            soft.extend(table.column("soft_label").to_pylist())
        if exact:
            shape = (facts["channels"], *facts["resolution"])
            for row in table.column("raydd_normalised").to_pylist():
                images.append(torch.tensor(row, dtype=torch.float32).view(shape) if len(row) == math.prod(shape)
                              else torch.zeros(0))
        else:
            for i, cell in enumerate(table.column("image").to_pylist()):
                data = cell.get("bytes") if isinstance(cell, dict) else cell
                if not isinstance(data, (bytes, bytearray)):
                    raise ImportFormatError(f"{path}: row {i}'s image holds no bytes, expected PNG/JPEG bytes")
                images.append(_normalise(_decode_image(bytes(data), facts, f"{path} row {i}").unsqueeze(0), facts)[0])
    if any(img.dim() != 3 or tuple(img.shape) != (facts["channels"], *facts["resolution"]) for img in images):
        bad = next(tuple(img.shape) for img in images
                   if img.dim() != 3 or tuple(img.shape) != (facts["channels"], *facts["resolution"]))
        raise ImportFormatError(f"{source}: an image of shape {bad}, expected {facts['channels']}x"
                                f"{facts['resolution'][0]}x{facts['resolution'][1]} for {facts['name']}")
    if any(not isinstance(v, int) for v in labels):
        raise ImportFormatError(f"{source}: the label column holds {sorted({type(v).__name__ for v in labels})}, "
                                f"expected integer class ids")
    stacked = torch.stack(images) if images else torch.zeros(0, facts["channels"], *facts["resolution"])
    _check_images(stacked, facts, str(source))
    label_tensor = torch.tensor(soft, dtype=torch.float32) if soft else torch.tensor(labels, dtype=torch.int64)
    label_tensor, how = _labels(label_tensor, len(images), facts["num_classes"], str(source))
    return stacked, label_tensor, None, {"files": [str(p.relative_to(source)) if source.is_dir() else p.name
                                                   for p in files],
                                         "labels": how, "pixels": "exact float" if exact else "decoded PNG/JPEG"}


def _read_imagefolder(source: Path, facts: dict) -> tuple[torch.Tensor, torch.Tensor, float | None, dict]:
    if not source.is_dir():
        raise ImportFormatError(f"{source}: expected a folder of class folders (ROOT/<class>/<image>)")
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    if len(classes) != facts["num_classes"]:
        raise ImportFormatError(f"{source}: {len(classes)} class folders, expected {facts['num_classes']} for "
                                f"{facts['name']}")
    names = facts.get("class_names") or []
    order = [names.index(c) for c in classes] if sorted(names) == classes else list(range(len(classes)))
    images, labels = [], []
    for folder, label in zip(classes, order):
        files = sorted(p for p in (source / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files:
            images.append(_decode_image(path.read_bytes(), facts, str(path)))
            labels.append(label)
    if not images:
        raise ImportFormatError(f"{source}: no {'/'.join(IMAGE_SUFFIXES)} images in its class folders")
    bad = [i for i, img in enumerate(images) if tuple(img.shape[1:]) != tuple(facts["resolution"])]
    if bad:
        raise ImportFormatError(f"an image of {images[bad[0]].shape[1]}x{images[bad[0]].shape[2]} in {source}, "
                                f"expected {facts['resolution'][0]}x{facts['resolution'][1]} for {facts['name']}")
    return _normalise(torch.stack(images), facts), torch.tensor(labels, dtype=torch.int64), None, {
        "files": f"{len(images)} images in {len(classes)} class folders", "labels": "class folders",
        "classes": classes}


READERS = {"tensors": _read_tensors, "parquet": _read_parquet, "imagefolder": _read_imagefolder}


def detect_format(source: Path) -> str:
    """The format of ``source`` by what it holds (``tensors``, ``parquet`` or ``imagefolder``)."""
    if source.is_file():
        if source.suffix == ".parquet":
            return "parquet"
        if source.suffix == ".pt":
            return "tensors"
        raise ImportFormatError(f"{source}: a {source.suffix or 'suffixless'} file; expected images_*.pt, "
                                f"a .parquet file or a folder")
    if not source.is_dir():
        raise ImportFormatError(f"{source}: no such file or folder")
    if any(source.glob("images_*.pt")):
        return "tensors"
    if any(source.rglob("*.parquet")):
        return "parquet"
    if any(p.is_dir() for p in source.iterdir()):
        return "imagefolder"
    raise ImportFormatError(f"{source}: holds no images_*.pt, no .parquet and no class folders: expected one of "
                            f"the formats {', '.join(FORMATS)}")


def import_set(source: str | os.PathLike, dataset: str, *, fmt: str | None = None, zca: bool = False,
               data_root: str | None = None) -> SyntheticSet:
    """A released distilled set as a raydd :class:`SyntheticSet` (see the module docstring for the formats).

    ``dataset`` names the data the set was distilled from (its normalisation and shape); ``zca=True`` says the
    images live in that dataset's ZCA space (MTT/DATM's ``--zca``): the ZCA is fitted on its training split
    (``data_root``), as those codes do, and evaluation whitens the test set alike.
    """
    source = Path(source).expanduser()
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is invalid: accepted {', '.join(FORMATS)}")
    facts = dataset_facts(dataset, data_root)
    fmt = fmt or detect_format(source)
    if fmt != "tensors" and zca:
        raise ValueError(f"zca applies to the tensors format only (images saved in ZCA space), not {fmt}")
    images, labels, syn_lr, provenance = READERS[fmt](source, facts)
    record = card_record(source) if fmt == "parquet" and source.is_dir() else None
    if record is not None:  # a raydd export: its method, knobs, step size and provenance come back as written
        if record["dataset"].get("name") != dataset:
            raise ValueError(f"{source} was exported from a {record['dataset'].get('name')} set, not {dataset}: "
                             f"pass --dataset {record['dataset'].get('name')}")
        imported = {"source": str(source), "format": fmt, **provenance, "card": "raydd"}
        return SyntheticSet(images=images, labels=labels, dataset=record["dataset"], method=record["method"],
                            config=record["config"], syn_lr=record["syn_lr"], iteration=record["iteration"],
                            meta={**record["meta"], "imported": imported})
    state = None
    if zca:
        from .data.zca import ZCAWhitening

        state = ZCAWhitening(eps=0.1).fit(load_dataset(dataset, "train", data_root).images).state_dict()
        facts = {**facts, "zca": True}
    imported = {"source": str(source), "format": fmt, **provenance, "zca": bool(zca),
                "syn_lr": syn_lr, "soft_labels": labels.dim() == 2}
    return SyntheticSet(images=images, labels=labels, dataset=facts, method=f"imported:{fmt}", syn_lr=syn_lr,
                        zca=state, meta={"imported": imported})


# --------------------------------------------------------------------------- out
def _png(pixels: torch.Tensor) -> bytes:
    from PIL import Image

    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def export_set(synthetic: SyntheticSet, out_dir: str | os.PathLike, *, evaluation: dict | None = None,
               ledger_row: dict | None = None) -> Path:
    """Write ``synthetic`` as a Hugging Face parquet folder with a dataset card (see the module docstring).

    ``evaluation``: e.g. ``{"protocol": "standard", "accuracy": 0.81, "std": 0.01, "models": 5}``;
    ``ledger_row``: the ``raydd reproduce`` ledger row the set came from. The folder is written under a
    temporary name and renamed into place: a crash leaves no half-written export.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from importlib import metadata

    try:
        version = metadata.version("raydd")
    except metadata.PackageNotFoundError:  # a checkout that is not installed
        version = "unknown (not installed)"
    out = Path(out_dir).expanduser()
    if out.exists():
        raise ValueError(f"{out} exists: export writes a new folder (remove it or choose another)")
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent} is not a folder: export writes {out.name} inside an existing folder")
    if synthetic.zca is not None:
        raise ValueError("this set's images live in ZCA space: export takes sets in the dataset's normalisation "
                         "(condense without zca, or evaluate the set where it is)")
    pixels = synthetic.pixels()
    hard = synthetic.hard_labels.tolist()
    columns = {
        "image": pa.array([{"bytes": _png(p), "path": f"{i:05d}.png"} for i, p in enumerate(pixels)],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "label": pa.array(hard, type=pa.int64()),
        "raydd_normalised": pa.array(synthetic.images.detach().float().reshape(len(synthetic), -1).tolist(),
                                     type=pa.list_(pa.float32())),
    }
    if synthetic.soft:
        columns["soft_label"] = pa.array(synthetic.labels.float().tolist(), type=pa.list_(pa.float32()))
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    (tmp / "data").mkdir(parents=True)
    pq.write_table(pa.table(columns), tmp / "data" / "train-00000-of-00001.parquet")
    record = {"method": synthetic.method, "dataset": synthetic.dataset, "config": synthetic.config,
              "syn_lr": synthetic.syn_lr, "iteration": synthetic.iteration, "meta": synthetic.meta,
              "evaluation": evaluation, "ledger_row": ledger_row, "raydd_version": version}
    (tmp / "README.md").write_text(_card(synthetic, record))
    os.replace(tmp, out)
    return out


def _card(synthetic: SyntheticSet, record: dict) -> str:
    names = synthetic.dataset.get("class_names") or [str(c) for c in range(synthetic.dataset["num_classes"])]
    ev = record["evaluation"] or {}
    accuracy = (f"{100 * ev['accuracy']:.2f} ± {100 * ev.get('std', 0.0):.2f} % ({ev.get('protocol', '?')} "
                f"protocol, {ev.get('models', '?')} networks)") if "accuracy" in ev else "not evaluated"
    knobs = "\n".join(f"| {k} | {v} |" for k, v in sorted(synthetic.config.items())) or "| – | – |"
    front = ["---", "license: other", "task_categories:", "- image-classification",
             "configs:", "- config_name: default", "  data_files:", "  - split: train",
             "    path: data/train-*", "dataset_info:", "  features:", "  - name: image", "    dtype: image",
             "  - name: label", "    dtype:", "      class_label:", "        names:"]
    front += [f"          '{i}': {json.dumps(str(n))}" for i, n in enumerate(names)]
    front += ["  - name: raydd_normalised", "    sequence: float32"]
    if synthetic.soft:
        front += ["  - name: soft_label", "    sequence: float32"]
    front += [f"{CARD_MARKER} {json.dumps(record, sort_keys=True, default=str)}", "---"]
    body = [
        f"# {synthetic.method} distilled set of {synthetic.dataset['name']} ({len(synthetic)} images)", "",
        f"Written by raydd {record['raydd_version']}. `image` is the PNG view (8-bit pixels); "
        "`raydd_normalised` the exact float images in the dataset's normalisation "
        f"(mean {synthetic.dataset['mean']}, std {synthetic.dataset['std']}); `label` the class id"
        + ("; `soft_label` the soft label rows." if synthetic.soft else "."), "",
        f"- method: {synthetic.method}, iteration {synthetic.iteration}",
        f"- learned step size: {synthetic.syn_lr}",
        f"- evaluation: {accuracy}",
        f"- ledger row: {json.dumps(record['ledger_row'], sort_keys=True) if record['ledger_row'] else 'none'}", "",
        "| knob | value |", "|---|---|", knobs, "",
        "Read it back: `raydd import DIR --dataset " + synthetic.dataset["name"] + "` (exact tensors and metadata),",
        "or `datasets.load_dataset(\"parquet\", data_dir=DIR)`.", ""]
    return "\n".join(front + body)


def card_record(folder: str | os.PathLike) -> dict | None:
    """The ``raydd:`` metadata of an exported folder's card, or None when the folder has no raydd card."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        return None
    for line in card.read_text().splitlines():
        if line.startswith(CARD_MARKER):
            try:
                return json.loads(line[len(CARD_MARKER):])
            except json.JSONDecodeError as err:
                raise ImportFormatError(f"{card}: its {CARD_MARKER} line is not JSON ({err})") from None
    return None
