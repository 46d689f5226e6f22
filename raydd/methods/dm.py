"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

Per iteration (paper Sec. 3.2, eq. 4; reference VICO-UoE/DatasetCondensation main_DM.py):
  1. sample a randomly initialised embedding network ψ_ϑ (ϑ ~ P_ϑ: the architecture's default
     initialisation, seeded from ``self.generator``; parameters frozen, requires_grad False);
  2. for each class c: a batch of ``batch_real`` real images of class c and the IPC synthetic
     images of class c go through the SAME differentiable siamese augmentation A(·, ω_c)
     (one seed ω_c per class, drawn from ``self.generator``);
  3. L = Σ_c ‖ mean ψ_ϑ(A(x_c, ω_c)) − mean ψ_ϑ(A(s_c, ω_c)) ‖²                        (eq. 4)
  4. one SGD(lr_img, momentum 0.5) step on the pixels of S.

BatchNorm embedders (``norm="batch"``) embed all classes' real images in one forward and all
synthetic images in another, as the reference does for ConvNetBN (batch statistics are then
those of the whole multi-class batch). Instance-norm and norm-free embedders embed every class
separately and backpropagate its term right away (same gradients, one class's graph alive at a
time) or, with ``embed_classes_together`` (default: on CUDA only), take the BatchNorm branch's
shape: every class's augmented real batch in one no-grad forward, every class's augmented
synthetic images in one forward, one backward of Σ_c L_c — exact there, since each sample is
embedded on its own; each class keeps its own siamese draw ω_c, drawn in the same order.

Randomness: the embedder seed, the real batches and the augmentation seeds are all drawn from
``self.generator`` in a fixed order, so ``state_dict()`` resumes bit-exactly.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data.augment import DSA_STRATEGY, DSAConfig, make_dsa
from ..graphs import GraphedIteration, table_from, table_inputs
from ..models import FlatModel, ModelSpec, build_model, default_depth, flatten_params
from ..models.spec import ARCHITECTURES, NORMS
from .base import (CondensationMethod, MethodConfig, PaperProtocol, Scale, StepMeter, clone_tree,
                   embed_classes_together, register_method)
from .initial import class_labels, random_real_indices
from .synthetic import SyntheticSet
from ..training import ENGINES
from ..validation import check_choice

_SEED_HIGH = 2 ** 31 - 1  # augmentation seeds are drawn in [0, 2^31 - 1)
_NET_SEED_HIGH = 2 ** 62  # embedder seeds


@dataclass(frozen=True)
class DMConfig(MethodConfig):
    """DM knobs. The paper uses the same settings for every dataset and IPC (Sec. 4.1,
    reference main_DM.py defaults): lr_img 1, momentum 0.5, 256 real images per class,
    real-image init, DSA on, 20000 iterations, embedder = the evaluation ConvNet
    (ConvNet-3, width 128, instance norm; depth 4 at 64 px, 5 at 128 px)."""

    lr_img: float = 1.0  # SGD learning rate of the synthetic pixels
    momentum: float = 0.5  # SGD momentum of the synthetic pixels
    batch_real: int = 256  # real images per class per iteration (all of the class if it has fewer)
    init: str = "real"  # 'real' (random real images of each class) or 'noise' (N(0, 1) pixels)
    dsa: bool = True  # differentiable siamese augmentation on real and synthetic batches
    dsa_strategy: str = DSA_STRATEGY  # flip is dropped automatically where the dataset forbids it
    arch: str = "convnet"  # embedder architecture (the paper's ablation also learns with ResNets)
    width: int | None = None  # None: 128 for ConvNet, 64 (stem) for ResNets
    depth: int | None = None  # ConvNet depth; None: models.default_depth (2 at 8 px, 3 up to 32 px, 4 at 64, 5 at 128)
    norm: str = "instance"  # 'instance' | 'batch' | 'none'
    # all classes in one real and one synthetic forward (instance norm / none only); None: on CUDA only
    embed_classes_together: bool | None = None
    # How an iteration runs (raydd.training.ENGINES): eager, or graph — its random draws made up front (the
    # embedder's initialisation, the real batches, the siamese DSA draws) and on CUDA the rest of the iteration
    # (augmentation, both embeddings, eq. 4, the backward pass, the SGD step) replayed as one CUDA graph; the
    # classes embedded together (as embed_classes_together). The same numbers (tests/test_graphs.py).
    engine: str = "eager"

    default_iterations: ClassVar[int] = 20000
    engines: ClassVar[tuple[str, ...]] = ENGINES
    # The paper's settings are the same for every dataset and IPC; these are the ones it reports.
    published: ClassVar[tuple[tuple[str, int], ...]] = tuple(
        (d, i) for d in ("mnist", "fashion_mnist", "cifar10", "cifar100") for i in (1, 10, 50))
    reported: ClassVar[dict[tuple[str, int], float]] = {  # DANCE Table 1 = PTLM Table 3 (DM's rows)
        ("fashion_mnist", 1): 70.7, ("fashion_mnist", 10): 83.5, ("fashion_mnist", 50): 88.1,
        ("cifar10", 1): 26.0, ("cifar10", 10): 48.9, ("cifar10", 50): 63.0}
    paper: ClassVar[PaperProtocol] = PaperProtocol(
        "DANCE Table 1 = PTLM Table 3 (DM)", {"epochs": 1000, "num_models": 10},
        notes="DM's code evaluates ConvNet-3 w128 x 1000 epochs (1001 passes, lr x0.1 after pass 501: its "
              "evaluate_synset, raydd's standard protocol), the final accuracy of 100 networks (main_DM.py); the "
              "papers quoting its Fashion-MNIST rows state 10 runs and no source")

    def scaled(self, scale: Scale) -> "DMConfig":
        """The embedder at ``scale.width`` (the paper's is the width-128 evaluation ConvNet)."""
        return dataclasses.replace(self, width=scale.width)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check("lr_img", low=0, low_open=True)
        self.check("momentum", low=0, high=1, high_open=True)
        self.check("batch_real", low=1)
        self.check("width", low=1)
        self.check("depth", low=1)
        if self.init not in ("real", "noise"):
            raise ValueError(f"DMConfig.init={self.init!r} is invalid: accepted real, noise")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"DMConfig.arch={self.arch!r} is invalid: accepted {', '.join(ARCHITECTURES)}")
        if self.norm not in NORMS:
            raise ValueError(f"DMConfig.norm={self.norm!r} is invalid: accepted {', '.join(NORMS)}")
        DSAConfig(strategy=self.dsa_strategy)  # validates the strategy string
        embed_classes_together("DMConfig.embed_classes_together", self.embed_classes_together, self.norm,
                               torch.device("cpu"))
        check_choice("DMConfig.engine", self.engine, ENGINES)
        if self.engine == "graph" and self.embed_classes_together is False:
            raise ValueError("DMConfig.engine='graph' embeds the classes together: use embed_classes_together=null "
                             "or true with it (got false)")

    def model_spec(self, info) -> ModelSpec:
        """The embedder for a dataset with DatasetInfo ``info``."""
        depth = self.depth if self.depth is not None else default_depth(tuple(info.resolution))
        return ModelSpec(arch=self.arch, channels=info.channels, num_classes=info.num_classes,
                         resolution=tuple(info.resolution), width=self.width, depth=depth, norm=self.norm)


@register_method
class DM(CondensationMethod):
    name = "dm"
    label = "DM"
    config_cls = DMConfig
    cpu_chunk_bytes = 16 * 2 ** 20  # activation budget of one real-image forward on CPU (see _embed_mean)

    def __init__(self, config: DMConfig, train, store=None, *, device="auto", seed: int = 0) -> None:
        super().__init__(config, train, store, device=device, seed=seed)
        cfg, info = self.config, train.info
        self.model_spec = cfg.model_spec(info)
        with torch.random.fork_rng(devices=[]):  # fails here, before any work, if the spec does not fit
            build_model(self.model_spec)
        self.dsa = make_dsa(cfg.dsa_strategy, flip_ok=info.flip_ok) if cfg.dsa else None
        self.embed_together = cfg.engine == "graph" or embed_classes_together(
            "DMConfig.embed_classes_together", cfg.embed_classes_together, cfg.norm, self.device)
        self._graphed: GraphedIteration | None = None  # engine="graph": built at the first step
        self.num_classes = info.num_classes
        self._class_idx = [train.class_indices(c) for c in range(self.num_classes)]
        self._real = train.images.to(self.device)  # the reference keeps the whole training set on the device
        self.images, self.labels = self._init_synthetic()
        self.images.requires_grad_(True)
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum)

    # ------------------------------------------------------------------ setup
    def _init_synthetic(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, info = self.config, self.train.info
        labels = class_labels(info.num_classes, cfg.ipc)
        if cfg.init == "noise":
            images = torch.randn((len(labels), info.channels, *info.resolution), generator=self.generator)
        else:
            images = self.train.images[random_real_indices(self._class_idx, cfg.ipc, self.generator)].clone()
        return images.float().to(self.device), labels.to(self.device)

    def _embedder(self, generator: torch.Generator) -> torch.nn.Module:
        """A freshly initialised, frozen embedder: default init seeded from ``generator`` (CPU, then moved)."""
        net = self._embedder_on_cpu(generator).to(self.device).train()  # reference: net.train(); BN: batch stats
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def _embedder_on_cpu(self, generator: torch.Generator) -> torch.nn.Module:
        seed = int(torch.randint(_NET_SEED_HIGH, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):  # the global RNG is restored on exit
            torch.manual_seed(seed)
            return build_model(self.model_spec)

    def _draw_class_batch(self, c: int, generator: torch.Generator) -> tuple[torch.Tensor, int | None]:
        """(real images of class c, DSA seed): up to batch_real images without replacement."""
        idx = self._class_idx[c]
        pick = idx[torch.randperm(len(idx), generator=generator)[:self.config.batch_real]]
        seed = int(torch.randint(_SEED_HIGH, (1,), generator=generator)) if self.dsa is not None else None
        return self._real[pick.to(self._real.device)], seed

    def _augment(self, x: torch.Tensor, seed: int | None) -> torch.Tensor:
        return x if self.dsa is None else self.dsa(x, seed=seed)

    # ------------------------------------------------------------------ the objective
    def _embed_mean(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Mean embedding of ``x`` (no BatchNorm: samples are independent, so chunking is exact up to
        float rounding). On CPU in chunks whose first activation stays under ``cpu_chunk_bytes``:
        larger buffers are mmap-allocated, returned to the OS and faulted back in every iteration
        (measured: a third to half of the step time on Fashion-MNIST)."""
        return self._embed_rows(net, x).mean(0)

    def _embed_rows(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Per-sample embeddings of ``x`` (no BatchNorm), chunked on CPU as ``_embed_mean``."""
        if self.device.type != "cpu":
            return net.embed(x)
        height, width = x.shape[-2:]
        chunk = max(1, self.cpu_chunk_bytes // (self.model_spec.width * (height + 4) * (width + 4) * 4))
        return torch.cat([net.embed(part) for part in x.split(chunk)])

    def _distribution_loss(self, generator: torch.Generator, *, backward: bool) -> torch.Tensor:
        """Eq. 4 for one embedder and one set of class batches/augmentations drawn from ``generator``.

        With ``backward`` the gradient w.r.t. the synthetic pixels is accumulated into
        ``self.images.grad``; the returned loss is detached either way.
        """
        ipc = self.config.ipc
        net = self._embedder(generator)
        images = self.images if backward else self.images.detach()
        batch_norm = self.model_spec.norm == "batch"
        if batch_norm or self.embed_together:  # reference ConvNetBN branch: one forward per set
            reals, syns = [], []
            for c in range(self.num_classes):
                real, seed = self._draw_class_batch(c, generator)
                reals.append(self._augment(real, seed))
                syns.append(self._augment(images[c * ipc:(c + 1) * ipc], seed))
            sizes = [len(r) for r in reals]
            with torch.no_grad():  # BN: one forward (batch statistics); otherwise per sample, chunked on CPU
                real = torch.cat(reals)
                real_feats = (net.embed(real) if batch_norm else self._embed_rows(net, real)).split(sizes)
            real_means = torch.stack([f.mean(0) for f in real_feats])
            syn_means = net.embed(torch.cat(syns)).view(self.num_classes, ipc, -1).mean(1)
            loss = (real_means - syn_means).pow(2).sum()  # eq. 4: Σ_c ‖mean ψ(A(x_c, ω_c)) − mean ψ(A(s_c, ω_c))‖²
            if backward:
                loss.backward(inputs=[self.images])
            return loss.detach()
        total = torch.zeros((), device=self.device)
        for c in range(self.num_classes):
            real, seed = self._draw_class_batch(c, generator)
            with torch.no_grad():
                real_mean = self._embed_mean(net, self._augment(real, seed))
            syn_mean = net.embed(self._augment(images[c * ipc:(c + 1) * ipc], seed)).mean(0)
            loss_c = (real_mean - syn_mean).pow(2).sum()
            if backward:
                loss_c.backward(inputs=[self.images])  # Σ_c ∇L_c = ∇L; frees class c's graph now
            total = total + loss_c.detach()
        return total

    def step(self) -> dict[str, float]:
        if self.config.engine == "graph":
            return self._graph_step()
        step_meter = StepMeter(self.device)
        self.opt_img.zero_grad(set_to_none=True)
        loss = self._distribution_loss(self.generator, backward=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DM loss is {float(loss)} at iteration {self._iteration}: "
                                     f"lower lr_img ({self.config.lr_img})")
        grad_norm = float(self.images.grad.norm())
        self.opt_img.step()
        self._iteration += 1
        metrics = {"loss": float(loss), "loss_per_class": float(loss) / self.num_classes,
                   "grad_norm_img": grad_norm}
        return step_meter.finish(metrics)

    # ------------------------------------------------------------------ engine="graph"
    def _plan_iteration(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The iteration's random draws in the order ``_distribution_loss`` draws them — the embedder's seed and
        initialisation, then per class its real batch and DSA seed — as named inputs: the embedder's flat
        parameters, the real images' indices, and the siamese draws as DSA tables of the real and the synthetic
        images (each class's one draw repeated over its images)."""
        net = self._embedder_on_cpu(generator)
        picks, real_draws, syn_draws = [], [], []
        size, ipc = tuple(self.images.shape[-2:]), self.config.ipc
        for c in range(self.num_classes):
            idx = self._class_idx[c]
            picks.append(idx[torch.randperm(len(idx), generator=generator)[:self.config.batch_real]])
            if self.dsa is not None:
                seed = int(torch.randint(_SEED_HIGH, (1,), generator=generator))
                draw = self.dsa.draw(torch.Generator().manual_seed(seed), 1, size) if self.dsa.ops else None
                real_draws.append(draw)
                syn_draws.append(draw)
        inputs = {"params": flatten_params(net).to(self.device), "idx": torch.cat(picks).to(self.device)}
        if real_draws and real_draws[0] is not None:
            sizes = [len(p) for p in picks]
            inputs.update({k: v.to(self.device) for k, v in table_inputs(
                self.dsa.table([d.repeated(n) for d, n in zip(real_draws, sizes)], sizes), "r_").items()})
            inputs.update({k: v.to(self.device) for k, v in table_inputs(
                self.dsa.table([d.repeated(ipc) for d in syn_draws], [ipc] * self.num_classes), "s_").items()})
        return inputs

    def _graph_iteration(self, inputs: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """One iteration on planned draws (what the CUDA graph captures): eq. 4 over every class with the
        embedder's parameters ``inputs["params"]``, the backward pass into S and its SGD step; loss and the
        gradient norm left in ``out``."""
        ipc, flat = self.config.ipc, self._graph_net
        real = self._real[inputs["idx"]]
        syn = self.images
        if self.dsa is not None and self.dsa.ops:
            real = self.dsa.apply_table(real, table_from(inputs, self.dsa, "r_"))
            syn = self.dsa.apply_table(syn, table_from(inputs, self.dsa, "s_"))
        sizes = [len(idx) for idx in self._class_batches()]
        with torch.no_grad():
            real_feats = self._embed_rows_flat(flat, inputs["params"], real).split(sizes)
        real_means = torch.stack([f.mean(0) for f in real_feats])
        syn_means = flat.embed(inputs["params"], syn).view(self.num_classes, ipc, -1).mean(1)
        loss = (real_means - syn_means).pow(2).sum()  # eq. 4
        self.opt_img.zero_grad(set_to_none=True)
        loss.backward(inputs=[self.images])
        out[0].copy_(loss.detach())
        out[1].copy_(self.images.grad.norm())
        self.opt_img.step()

    def _class_batches(self) -> list[range]:
        """Each class's real batch positions (its size: batch_real, or the whole class if smaller)."""
        return [range(min(self.config.batch_real, len(idx))) for idx in self._class_idx]

    def _embed_rows_flat(self, flat: FlatModel, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``_embed_rows`` at the parameters ``params`` (a BatchNorm embedder: one forward, batch statistics)."""
        if self.device.type != "cpu" or self.model_spec.norm == "batch":
            return flat.embed(params, x)
        height, width = x.shape[-2:]
        chunk = max(1, self.cpu_chunk_bytes // (self.model_spec.width * (height + 4) * (width + 4) * 4))
        return torch.cat([flat.embed(params, part) for part in x.split(chunk)])

    def _graph_step(self) -> dict[str, float]:
        if self._graphed is None:
            with torch.random.fork_rng(devices=[]):
                net = build_model(self.model_spec).to(self.device).train()
            for p in net.parameters():
                p.requires_grad_(False)
            self._graph_net = FlatModel(net)
            self._graphed = GraphedIteration(self._graph_iteration, device=self.device, metrics=2,
                                             leaves=lambda: [self.images], optimisers=[self.opt_img])
        step_meter = StepMeter(self.device)
        loss, grad_norm = self._graphed.run(self._plan_iteration(self.generator))
        if not math.isfinite(loss):
            raise FloatingPointError(f"DM loss is {loss} at iteration {self._iteration}: "
                                     f"lower lr_img ({self.config.lr_img})")
        self._iteration += 1
        return step_meter.finish({"loss": loss, "loss_per_class": loss / self.num_classes,
                                  "grad_norm_img": grad_norm})

    def matching_loss(self, seed: int = 0) -> float:
        """Eq. 4 for a fixed embedder/real batches/augmentations (from ``seed``), without updating S.

        Does not touch the method's own generators: compare the same problem before and after
        some iterations.
        """
        with torch.no_grad():
            return float(self._distribution_loss(torch.Generator().manual_seed(seed), backward=False))

    # ------------------------------------------------------------------ results and state
    def synthetic_set(self) -> SyntheticSet:
        return self._synthetic(self.images.detach().cpu().clone(), self.labels.detach().cpu().clone(),
                               {"embedder": self.model_spec.to_dict(), "seed": self.seed})

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({"images": self.images.detach().clone(), "labels": self.labels.detach().clone(),
                      "opt_img": clone_tree(self.opt_img.state_dict())})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.labels = state["labels"].to(self.device).clone()
        self.opt_img.load_state_dict(state["opt_img"])
