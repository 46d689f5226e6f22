"""DANCE: Dual-View Distribution Alignment for Dataset Condensation (Zhang et al., IJCAI 2024).

Per iteration i (paper Algorithm 1):
  1. pick one of N pre-trained experts (store kind ``pretrain``: epoch 0 = φ_0, last epoch = φ_expert);
  2. mid encoder φ_mid = λ·φ_0 + (1−λ)·φ_expert, λ ~ U(0, lam_max) (Eq. 3; the paper draws U(0, 1));
  3. PLTDA (Eq. 4): for every class, ‖mean φ_mid(A(x_real)) − mean φ_mid(A(x_syn))‖² with one siamese
     DSA draw A shared by the class's real batch and its synthetic images; S ← S − η∇Σ_c L_c;
  4. every I_c iterations (``calib_interval``), Distribution Calibration (Eq. 5): the mean cross-entropy
     of the trained expert θ_expert on the (augmented) synthetic images and their labels; S ← S − η∇L_calib.

Factoring & up-sampling (Sec. 3.3, from IDC, Kim et al. 2022): each stored image holds l×l tiles; a tile
is cropped and bilinearly up-sampled to full resolution when used, so IPC stored images per class are
IPC·l² training images (labels repeated). ``images`` (the encoded, stored tensor) is the method state;
``synthetic_set()`` returns the decoded set. Initialisation: every tile is a down-sampled random real
image of its class (IDC 'mix' init; plain real images when l = 1).

The stored images are pixels in [0, 1], as the authors' code keeps them (its ``Synthesizer.data``; the
normalisation is the first step of its augmentation): decoded, then normalised with the dataset's mean and
std, then augmented. The step S ← S − η∇_S L is taken on the pixels, so η means what the code's lr_img
means (on normalised images the same η would move the pixels std² times less).

Details the paper leaves open follow the authors' code (Hansong-Zhang/DANCE): images are kept inside the
valid pixel range [0, 1] (clamped at the start of every iteration), real batches of 128 per class, at
most 200 decoded synthetic images per class per loss, matching augmentation ``color_crop_cutout`` with
all listed operations applied on every call (IDC's DiffAug), also applied in the calibration step.
Where the code and the paper differ, the paper is followed by default: one update per loss and iteration
and Eq. 5's mean over all synthetic images. ``step_per_class=True`` is the code's loop instead: an SGD step
after each class's Eq. 4 term and after each class's Eq. 5 term (its mean over that class's images), so
class c+1's loss is taken on the images class c's step (and the momentum) moved
(benchmarks/reference_equivalence.py --methods dance compares it with the code step by step).

``embed_classes_together`` (default: on CUDA only, and only with an instance-norm or norm-free expert)
puts every class's augmented real batch through the encoder in one no-grad forward and every class's
augmented synthetic images in one forward, then splits the features back per class: the same per-class
terms, one backward (the calibration's and PTLM's pseudo-label forwards likewise). Each class keeps its
own siamese draw, drawn from the generator in the per-class order. Exact up to float rounding, since
each sample is embedded on its own; refused with batch norm, whose statistics are per class here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from ..data.augment import DSAConfig, make_dsa
from ..data.datasets import ImageDataset
from ..models import FlatModel, ModelSpec, build_model
from .base import (CondensationMethod, MethodConfig, PaperProtocol, Scale, StepMeter, clone_tree,
                   embed_classes_together, register_method)
from .inputs import StoreInputs, TrajectoryNeed
from .initial import class_labels, random_real_indices
from .synthetic import SyntheticSet

MATCH_DSA = "color_crop_cutout"  # IDC/DANCE condensation augmentation (arg_condense.py aug_type)


# --------------------------------------------------------------------------- factoring (IDC)
def auto_factor(resolution: tuple[int, int]) -> int:
    """The paper's factor l: 2 for low/medium resolution (<= 64 px), 3 for the 128 px ImageNet subsets."""
    return 2 if max(resolution) <= 64 else 3


def tile_grid(size: int, factor: int) -> int:
    """Side of one tile: ceil(size / factor) (the last tile row/column may hang over the border)."""
    return -(-size // factor)


def encode_tiles(reals: torch.Tensor, factor: int, fill: torch.Tensor) -> torch.Tensor:
    """Pack ``reals`` [n·l², C, H, W] into n images of l×l down-sampled tiles (IDC 'mix' initialisation).

    Tile (i, j) of stored image k is real image (i·l + j)·n + k, resized (nearest, as IDC's
    F.interpolate default) to the tile side used by ``decode_tiles``; pixels of a tile that fall outside
    the image are dropped. ``fill`` [C] fills nothing when H, W are multiples of l.
    """
    total, C, H, W = reals.shape
    n = total // factor ** 2
    if n * factor ** 2 != total:
        raise ValueError(f"{total} real images cannot fill whole images of {factor}x{factor} tiles")
    sh, sw = tile_grid(H, factor), tile_grid(W, factor)
    small = F.interpolate(reals, size=(sh, sw), mode="nearest")
    out = fill.view(1, C, 1, 1).expand(n, C, H, W).clone()
    for i in range(factor):
        for j in range(factor):
            k = i * factor + j
            top, left = i * sh, j * sw
            h, w = min(sh, H - top), min(sw, W - left)
            if h > 0 and w > 0:
                out[:, :, top:top + h, left:left + w] = small[k * n:(k + 1) * n, :, :h, :w]
    return out


def decode_tiles(images: torch.Tensor, factor: int, fill: torch.Tensor) -> torch.Tensor:
    """Split every image [n, C, H, W] into l×l tiles and up-sample each to H×W (bilinear).

    Returns [n·l², C, H, W] tile-major (all images' tile (0,0), then tile (0,1), ...), as IDC's
    ``decode_zoom``; images whose side is not a multiple of l are padded with ``fill`` [C]
    (IDC pads with pixel value 0.5) on the bottom/right first. Differentiable in ``images``.
    """
    if factor == 1:
        return images
    n, C, H, W = images.shape
    sh, sw = tile_grid(H, factor), tile_grid(W, factor)
    pad_h, pad_w = sh * factor - H, sw * factor - W
    if pad_h or pad_w:
        canvas = fill.view(1, C, 1, 1).expand(n, C, H + pad_h, W + pad_w).clone()
        canvas = canvas.to(images.dtype)
        images = torch.cat([torch.cat([images, canvas[:, :, :H, W:]], 3), canvas[:, :, H:, :]], 2)
    tiles = [images[:, :, i * sh:(i + 1) * sh, j * sw:(j + 1) * sw] for i in range(factor) for j in range(factor)]
    return F.interpolate(torch.cat(tiles), size=(H, W), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class PretrainedDMConfig(MethodConfig):
    """Knobs shared by the distribution-matching methods that read ``pretrain`` experts (DANCE, PTLM)."""

    factor: int | None = None  # l; None: 2 up to 64 px, 3 above (paper Sec. 4.1); 1 disables factoring
    lr_img: float | None = None  # η; None: 0.01·IPC up to 64 px, 0.1·IPC above (paper Sec. 4.1)
    img_momentum: float = 0.5  # SGD momentum of the images (reference mom_img)
    num_experts: int = 5  # N pre-trained models (paper Sec. 4.1: 5); the first N of the store are used
    batch_real: int = 128  # real images per class per loss (reference batch_real)
    batch_syn_max: int = 200  # decoded synthetic images per class per loss, random subset if more
    dsa: bool = True
    dsa_strategy: str = MATCH_DSA  # flip is dropped automatically where the dataset forbids it
    dsa_all_ops: bool = True  # IDC's DiffAug applies every listed op on each call (False: one at random)
    clamp_pixels: bool = True  # keep the stored pixels in [0, 1] (reference clamps every iteration)
    pix_init: str = "real"  # 'real' (IDC tiles of real images) or 'noise'
    model: str | None = None  # store model name filter, e.g. 'convnet3-w128-in'; None: the only one stored
    expert_kind: str = "pretrain"  # store kind of the experts (farm recipe 'pretrain')
    # all classes in one real and one synthetic forward (instance norm / none only); None: on CUDA only
    embed_classes_together: bool | None = None

    published: ClassVar[tuple[tuple[str, int], ...]] = tuple(
        (d, i) for d in ("fashion_mnist", "cifar10", "cifar100") for i in (1, 10, 50))

    def needs(self) -> tuple[TrajectoryNeed, ...]:
        """``num_experts`` pre-trained experts, each storing its initialisation (epoch 0) and its trained weights."""
        return (TrajectoryNeed("pretrain", "pre-trained experts", kinds=(self.expert_kind,), count=self.num_experts,
                               model=self.model, zca=False),)

    def scaled(self, scale: Scale) -> "PretrainedDMConfig":
        """At most ``scale.counts['pretrain']`` experts."""
        return dataclasses.replace(self, num_experts=min(self.num_experts, scale.counts.get("pretrain",
                                                                                          self.num_experts)))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("factor", low=1)
        self.check("lr_img", low=0, low_open=True)
        self.check("img_momentum", low=0, high=1, high_open=True)
        for key in ("num_experts", "batch_real", "batch_syn_max"):
            self.check(key, low=1)
        if self.pix_init not in ("real", "noise"):
            raise ValueError(f"{type(self).__name__}.pix_init={self.pix_init!r} is invalid: accepted real, noise")
        DSAConfig(strategy=self.dsa_strategy)  # validates the strategy string

    @classmethod
    def defaults(cls, dataset: str, ipc: int) -> "PretrainedDMConfig":
        # factor and lr_img depend on the resolution (known once the data is loaded): None = auto
        return cls(dataset=dataset, ipc=ipc)


@dataclass(frozen=True)
class DANCEConfig(PretrainedDMConfig):
    """DANCE knobs: paper Sec. 3 and 4.1; the shared symbol λ (lam) is the upper end of λ ~ U(0, lam_max)."""

    lam_max: float = 1.0  # Eq. 3: λ ~ U(0, lam_max); the paper uses U(0, 1)
    calib_interval: int = 1  # I_c (Algorithm 1); the paper fixes calibration to every iteration; 0 disables
    calib_weight: float = 1.0  # multiplies Eq. 5 (the paper has none: 1)
    step_per_class: bool = False  # True: the authors' code's loop (a step after each class's term), see above

    aliases: ClassVar[dict[str, str]] = {"lam": "lam_max"}
    default_iterations: ClassVar[int] = 10000  # reference reproduce_condense.py niter
    reported: ClassVar[dict[tuple[str, int], float]] = {
        ("fashion_mnist", 1): 81.5, ("fashion_mnist", 10): 86.3, ("fashion_mnist", 50): 86.9,
        ("cifar10", 1): 47.1, ("cifar10", 10): 70.8, ("cifar10", 50): 76.1}
    paper: ClassVar[PaperProtocol] = PaperProtocol(
        "DANCE Table 1", {"epochs": 1500, "num_models": 10, "batch_size": 64}, {"pretrain": (5, 60)},
        notes="DANCE's evaluation (arg_condense.py, train.py) decays lr x0.2 at epochs 1000 and 1250 and adds "
              "CutMix (raydd's standard protocol: DC/MTT's x0.1 after pass E//2 + 1, no CutMix); its released code "
              "prints the best test accuracy over epochs 250-1500, raydd the final one. Condensation: raydd steps "
              "once per loss and iteration (Algorithm 1 lines 6 and 9); DANCE.py steps after each class's term "
              "(step_per_class=True is that loop, equal to it step for step: benchmarks/reference_equivalence.py "
              "--methods dance); its 'mix' initialisation takes each class's first IPC*l^2 images, raydd random ones "
              "(Algorithm 1 line 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("lam_max", low=0, high=1, low_open=True)
        self.check("calib_interval", low=0)
        self.check("calib_weight", low=0)
        if self.step_per_class and self.embed_classes_together:
            raise ValueError("DANCEConfig.step_per_class=True with embed_classes_together=True is refused: each "
                             "class's loss reads the images the previous class's step moved; use "
                             "embed_classes_together=false or null with step_per_class")


# --------------------------------------------------------------------------- experts
@dataclass
class PretrainedExpert:
    trajectory_id: str
    initial: torch.Tensor  # flat φ_0 (epoch 0)
    final: torch.Tensor  # flat φ_expert (last stored epoch)
    final_epoch: int


def load_pretrained_experts(inputs: StoreInputs, config: PretrainedDMConfig, device: torch.device
                            ) -> tuple[list[PretrainedExpert], dict]:
    """The first ``num_experts`` experts of the store (sorted by path) with their initial and final weights."""
    (need,) = config.needs()
    infos = inputs.find(need)
    usable = [i for i in infos if 0 in i.epochs and max(i.epochs) > 0]
    if len(usable) < config.num_experts:
        raise inputs.missing(f"num_experts={config.num_experts} but only {len(usable)} of the {len(infos)} "
                             f"trajectories matching {need.filters(config.dataset)} in {inputs.store.root} store "
                             f"both epoch 0 and a trained epoch: lower num_experts with --set or farm more")
    def load(entry) -> PretrainedExpert:
        last = max(entry.epochs)
        return PretrainedExpert(entry.trajectory_id, inputs.params(entry.trajectory_id, 0, device),
                                inputs.params(entry.trajectory_id, last, device), last)

    experts = []
    for entry in usable:  # the first num_experts healthy ones (a corrupt one is reported and skipped)
        experts += inputs.healthy([entry], load)
        if len(experts) == config.num_experts:
            return experts, infos[0].meta
    raise inputs.missing(f"num_experts={config.num_experts} but only {len(experts)} of the {len(usable)} usable "
                         f"trajectories matching {need.filters(config.dataset)} in {inputs.store.root} are not "
                         f"corrupt: lower num_experts with --set or farm more")


# --------------------------------------------------------------------------- shared machinery
class PretrainedDM(CondensationMethod):
    """Factored synthetic set + pre-trained experts + per-class feature-mean matching (DANCE, PTLM)."""

    config_cls: ClassVar[type[MethodConfig]] = PretrainedDMConfig

    @classmethod
    def check_data(cls, config: PretrainedDMConfig, train: ImageDataset) -> None:
        """IPC against the smallest class, and with pix_init=real the ipc·factor² real images per class that
        the factorised initialisation crops."""
        super().check_data(config, train)
        info = train.info
        factor = config.factor if config.factor is not None else auto_factor(info.resolution)
        if factor > min(info.resolution):
            raise ValueError(f"factor={factor} is larger than the image side {min(info.resolution)}: "
                             f"use factor <= {min(info.resolution)}")
        smallest = int(torch.bincount(train.labels, minlength=info.num_classes).min())
        needed = config.ipc * factor ** 2
        if config.pix_init == "real" and needed > smallest:
            raise ValueError(f"ipc={config.ipc} with factor={factor} needs {needed} real images per class to "
                             f"initialise, but the smallest class of {info.name} has {smallest}: use "
                             f"ipc <= {smallest // factor ** 2} or --set factor=1")

    def __init__(self, config: PretrainedDMConfig, train: ImageDataset, store=None, *, device="auto",
                 seed: int = 0) -> None:
        super().__init__(config, train, store, device=device, seed=seed)
        cfg, info = self.config, train.info
        self.factor = cfg.factor if cfg.factor is not None else auto_factor(info.resolution)
        self.lr_img = cfg.lr_img if cfg.lr_img is not None else (0.01 if max(info.resolution) <= 64 else 0.1) * cfg.ipc
        self.experts, self.expert_meta = load_pretrained_experts(self.inputs, cfg, self.device)
        self.model_spec = ModelSpec.from_dict(self.expert_meta["model"])
        with torch.random.fork_rng(devices=[]):  # the network's own init is never used: weights come from the store
            torch.manual_seed(seed)
            self.net = build_model(self.model_spec).to(self.device).train()
        self.flat_model = FlatModel(self.net)
        self.embed_together = embed_classes_together(f"{type(cfg).__name__}.embed_classes_together",
                                                     cfg.embed_classes_together, self.model_spec.norm, self.device)
        if self.flat_model.layout.numel != self.experts[0].final.numel():
            raise ValueError(f"experts store {self.experts[0].final.numel()} parameters but {self.model_spec.name} "
                             f"has {self.flat_model.layout.numel}: the store metadata and the model code disagree")
        self.dsa = make_dsa(cfg.dsa_strategy, flip_ok=info.flip_ok, single_per_call=not cfg.dsa_all_ops) \
            if cfg.dsa else None
        self._mean = torch.tensor(info.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._fill = torch.full((info.channels,), 0.5, device=self.device)  # IDC pads with grey (pixel 0.5)
        self._real = train.images.to(self.device)
        self._class_idx = [train.class_indices(c) for c in range(info.num_classes)]
        self.images, self.labels = self._init_synthetic()
        self.images.requires_grad_(True)
        self.optimizer = self.make_optimizer()

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The images' optimiser: SGD(lr_img, img_momentum) (NCFM: AdamW)."""
        return torch.optim.SGD([self.images], lr=self.lr_img, momentum=self.config.img_momentum)

    # ------------------------------------------------------------------ synthetic set
    def _init_synthetic(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, info = self.config, self.train.info
        labels = class_labels(info.num_classes, cfg.ipc)
        if cfg.pix_init == "noise":  # reference Synthesizer: clamp(randn / 4 + 0.5, 0, 1) in pixel space
            pixels = (torch.randn((len(labels), info.channels, *info.resolution), generator=self.generator) / 4
                      + 0.5).clamp(0, 1).to(self.device)
            return pixels.float(), labels.to(self.device)
        picks = random_real_indices(self._class_idx, cfg.ipc * self.factor ** 2, self.generator)
        per_class = []
        for class_picks in picks.view(info.num_classes, -1):
            reals = self._real[class_picks.to(self.device)] * self._std + self._mean  # back to pixels
            per_class.append(reals if self.factor == 1 else encode_tiles(reals, self.factor, self._fill))
        return torch.cat(per_class).float().clone(), labels.to(self.device)

    def decoded_class(self, c: int, images: torch.Tensor | None = None) -> torch.Tensor:
        """All IPC·l² decoded images of class ``c``, normalised (differentiable in the stored pixels)."""
        ipc = self.config.ipc
        stored = (self.images if images is None else images)[c * ipc:(c + 1) * ipc]
        return (decode_tiles(stored, self.factor, self._fill) - self._mean) / self._std

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full decoded set: IPC·l² images per class at full resolution, labels repeated."""
        images = self.images.detach()
        x = torch.cat([self.decoded_class(c, images) for c in range(self.train.info.num_classes)])
        per_class = self.config.ipc * self.factor ** 2
        y = torch.arange(self.train.info.num_classes, device=x.device).repeat_interleave(per_class)
        return x, y

    def _syn_batch(self, c: int, generator: torch.Generator) -> torch.Tensor:
        x = self.decoded_class(c)
        if x.shape[0] > self.config.batch_syn_max:
            keep = torch.randperm(x.shape[0], generator=generator)[:self.config.batch_syn_max]
            x = x[keep.to(self.device)]
        return x

    def _real_batch(self, c: int, generator: torch.Generator) -> torch.Tensor:
        idx = self._class_idx[c]
        picks = idx[torch.randperm(len(idx), generator=generator)[:self.config.batch_real]]
        return self._real[picks.to(self.device)]

    @staticmethod
    def _draw_seed(generator: torch.Generator) -> int:
        return int(torch.randint(2 ** 31 - 1, (1,), generator=generator))

    def _augment(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return x if self.dsa is None else self.dsa(x, seed=seed)  # siamese: one draw per seed

    def _clamp(self) -> None:
        if self.config.clamp_pixels:
            with torch.no_grad():
                self.images.clamp_(0.0, 1.0)

    # ------------------------------------------------------------------ losses
    def _feature_matching(self, flat: torch.Tensor, generator: torch.Generator, *, backward: bool,
                          select=None, keep_reals: list | None = None,
                          class_steps: list | None = None) -> tuple[float, float]:
        """Σ_c ‖mean f(A(real_c)) − mean f(A(syn_c))‖² at parameters ``flat`` (Eq. 4 / PTLM Eq. 6).

        Gradients are accumulated class by class (same result as backward of the sum, with the
        memory of one class). ``select(sim)`` -> bool mask keeps a subset of the real batch from the
        cosine similarities of its features to the mean synthetic feature (PTLM Eq. 3-4). With
        ``class_steps`` (a list), the optimiser steps after each class's backward instead (DANCE's code)
        and each step's gradient norm is appended. Returns (loss, fraction of real samples kept).
        """
        if self.embed_together and class_steps is None:
            return self._feature_matching_together(flat, generator, backward=backward, select=select,
                                                   keep_reals=keep_reals)
        total, kept, seen = 0.0, 0, 0
        for c in range(self.train.info.num_classes):
            real, syn, seed = self._draw_class(c, generator, keep_reals)
            with torch.no_grad():
                z_real = self.flat_model.embed(flat, self._augment(real, seed))
            z_syn = self.flat_model.embed(flat, self._augment(syn, seed))
            loss, n_kept = self._class_term(z_real, z_syn, select)
            kept, seen = kept + n_kept, seen + real.shape[0]
            if backward:
                loss.backward(inputs=self.matching_leaves())
                if class_steps is not None:
                    class_steps.append(self._update())
            total += float(loss.detach())
        return total, kept / seen

    def _draw_class(self, c: int, generator: torch.Generator,
                    keep_reals: list | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Class c's real batch, synthetic batch and siamese augmentation seed (shared by the two), drawn in
        this order by both feature-matching paths."""
        real = self._real_batch(c, generator)
        if keep_reals is not None:
            keep_reals.append(real)
        syn = self._syn_batch(c, generator)
        return real, syn, self._draw_seed(generator)

    @staticmethod
    def _class_term(z_real: torch.Tensor, z_syn: torch.Tensor, select) -> tuple[torch.Tensor, int]:
        """(‖mean f(A(real_c)) − mean f(A(syn_c))‖², real samples kept): DANCE Eq. 4 / PTLM Eq. 6 for one
        class, the real batch first reduced by ``select`` (PTLM Eq. 3-4) if given."""
        if select is not None:
            sim = F.cosine_similarity(z_real, z_syn.detach().mean(0, keepdim=True), dim=1)
            z_real = z_real[select(sim)]
        return (z_real.mean(0) - z_syn.mean(0)).pow(2).sum(), z_real.shape[0]

    def _feature_matching_together(self, flat: torch.Tensor, generator: torch.Generator, *, backward: bool,
                                   select=None, keep_reals: list | None = None) -> tuple[float, float]:
        """``_feature_matching`` with every class's real batch in one forward and every class's synthetic
        batch in another (instance norm / no norm: each sample embedded on its own), one backward."""
        reals, syns = [], []
        for c in range(self.train.info.num_classes):  # the per-class path's draws, in its order
            real, syn, seed = self._draw_class(c, generator, keep_reals)
            reals.append(self._augment(real, seed))
            syns.append(self._augment(syn, seed))
        with torch.no_grad():
            z_reals = self.flat_model.embed(flat, torch.cat(reals)).split([len(r) for r in reals])
        z_syns = self.flat_model.embed(flat, torch.cat(syns)).split([len(x) for x in syns])
        terms, kept, seen = [], 0, 0
        for z_real, z_syn in zip(z_reals, z_syns):
            term, n_kept = self._class_term(z_real, z_syn, select)
            terms.append(term)
            kept, seen = kept + n_kept, seen + z_real.shape[0]
        loss = torch.stack(terms).sum()
        if backward:
            loss.backward(inputs=self.matching_leaves())
        return float(loss.detach()), kept / seen

    def _classification(self, flat: torch.Tensor, targets: list, generator: torch.Generator, *, backward: bool,
                        weight: float = 1.0, class_steps: list | None = None) -> float:
        """weight · (1/|S|) Σ_j CE(f(A(x_j)), y_j) over the decoded synthetic images (Eq. 5 / PTLM Eq. 9).

        ``targets[c]``: the class id (hard label), a probability row (soft label) or None (class skipped).
        With ``class_steps`` (a list; DANCE's code): each class's term is the mean over that class's images,
        the optimiser steps after each class's backward and each step's gradient norm is appended.
        """
        used = [c for c, t in enumerate(targets) if t is not None]
        if not used:
            return float("nan")
        per_class = min(self.config.ipc * self.factor ** 2, self.config.batch_syn_max)
        n_total = per_class if class_steps is not None else per_class * len(used)
        if self.embed_together and class_steps is None:  # one forward of every class's augmented synthetic batch, one backward
            xs = [self._augment(self._syn_batch(c, generator), self._draw_seed(generator)) for c in used]
            logps = F.log_softmax(self.flat_model(flat, torch.cat(xs)), dim=1).split([len(x) for x in xs])
            ce_sum = sum(-logp[:, targets[c]].sum() if isinstance(targets[c], int)
                         else -(logp * targets[c].view(1, -1)).sum() for c, logp in zip(used, logps))
            loss = weight * ce_sum / n_total
            if backward:
                loss.backward(inputs=[self.images])
            return float(loss.detach())
        total = 0.0
        for c in used:
            x = self._augment(self._syn_batch(c, generator), self._draw_seed(generator))
            logp = F.log_softmax(self.flat_model(flat, x), dim=1)
            target = targets[c]
            if isinstance(target, int):
                ce_sum = -logp[:, target].sum()
            else:
                ce_sum = -(logp * target.view(1, -1)).sum()
            loss = weight * ce_sum / n_total
            if backward:
                loss.backward(inputs=[self.images])
                if class_steps is not None:
                    class_steps.append(self._update())
            total += float(loss.detach())
        return total

    def matching_leaves(self) -> list[torch.Tensor]:
        """What the matching loss's backward pass fills: the stored images (NCFM adds its sampling network)."""
        return [self.images]

    def _update(self) -> float:
        """One SGD step on the accumulated gradient; returns its norm."""
        grad = 0.0 if self.images.grad is None else float(self.images.grad.norm())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad

    def _check_finite(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.name} {what} is {value} at iteration {self._iteration}: "
                                     f"lower lr_img ({self.lr_img})")

    # ------------------------------------------------------------------ bookkeeping
    def synthetic_set(self) -> SyntheticSet:
        x, y = self.decoded()
        return self._synthetic(x.cpu().clone(), y.cpu().clone(), {
            "expert_model": self.model_spec.to_dict(), "store": str(self.store.root),
            "experts": [e.trajectory_id for e in self.experts], "seed": self.seed, "factor": self.factor,
            "lr_img": self.lr_img, "encoded_shape": list(self.images.shape)})

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "images": self.images.detach().clone(), "image_space": "pixels", "labels": self.labels.detach().clone(),
            "optimizer": clone_tree(self.optimizer.state_dict()),
            "experts": [e.trajectory_id for e in self.experts],
        })
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = list(state["experts"])
        mine = [e.trajectory_id for e in self.experts]
        if saved != mine:
            raise ValueError(f"checkpoint used experts {saved} but store {self.store.root} gives {mine}: "
                             f"resume needs the same pre-trained experts")
        if state.get("image_space") != "pixels":
            raise ValueError("checkpoint stores normalised images (written before raydd kept DANCE's and PTLM's "
                             "images as pixels in [0, 1], the authors' parameterisation): it cannot resume this "
                             "run; start it again without --resume")
        if tuple(state["images"].shape) != tuple(self.images.shape):
            raise ValueError(f"checkpoint images {tuple(state['images'].shape)} do not match "
                             f"{tuple(self.images.shape)} (factor {self.factor})")
        super().load_state_dict(state)
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.labels = state["labels"].to(self.device).clone()
        self.optimizer.load_state_dict(state["optimizer"])


# --------------------------------------------------------------------------- DANCE
@register_method
class DANCE(PretrainedDM):
    name = "dance"
    label = "DANCE"
    config_cls = DANCEConfig

    def __init__(self, config: DANCEConfig, train: ImageDataset, store=None, *, device="auto", seed: int = 0) -> None:
        super().__init__(config, train, store, device=device, seed=seed)
        if self.config.step_per_class:  # each class's loss reads the images the previous class's step moved
            self.embed_together = False

    def mid_encoder(self, expert: PretrainedExpert, lam: float) -> torch.Tensor:
        """Eq. 3: φ_mid = λ·φ_0 + (1−λ)·φ_expert."""
        return lam * expert.initial + (1.0 - lam) * expert.final

    def step(self) -> dict[str, float]:
        cfg = self.config
        step_meter = StepMeter(self.device)
        i = self._iteration + 1  # Algorithm 1 counts iterations from 1
        self._clamp()
        e = self.rng.randrange(len(self.experts))
        expert = self.experts[e]
        lam = float(torch.rand(1, generator=self.generator)) * cfg.lam_max
        self.optimizer.zero_grad(set_to_none=True)
        steps = [] if cfg.step_per_class else None  # the code's loop: a step per class, their gradient norms
        pltda, _ = self._feature_matching(self.mid_encoder(expert, lam), self.generator, backward=True,
                                          class_steps=steps)
        self._check_finite(pltda, "PLTDA loss")
        grad = self._update() if steps is None else math.hypot(*steps)
        metrics = {"loss": pltda, "pltda_loss": pltda, "lam": lam, "expert": float(e), "grad_norm_img": grad,
                   "calib_loss": float("nan")}
        if cfg.calib_interval and i % cfg.calib_interval == 0:
            targets = list(range(self.train.info.num_classes))
            steps = [] if cfg.step_per_class else None
            calib = self._classification(expert.final, targets, self.generator, backward=True,
                                         weight=cfg.calib_weight, class_steps=steps)
            self._check_finite(calib, "calibration loss")
            metrics["calib_loss"] = calib
            metrics["grad_norm_calib"] = self._update() if steps is None else math.hypot(*steps)
        self._iteration = i
        return step_meter.finish(metrics)

    # ------------------------------------------------------------------ fixed evaluations (no update)
    def matching_loss(self, expert: int = 0, lam: float = 0.5, seed: int = 0) -> float:
        """Eq. 4 for a fixed expert, λ and batch/augmentation seed; touches neither S nor the method's RNGs."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            loss, _ = self._feature_matching(self.mid_encoder(self.experts[expert], lam), generator, backward=False)
        return loss

    def calibration_loss(self, expert: int = 0, seed: int = 0) -> float:
        """Eq. 5 (times calib_weight) for a fixed expert and seed, without updating S."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return self._classification(self.experts[expert].final, list(range(self.train.info.num_classes)),
                                        generator, backward=False, weight=self.config.calib_weight)
