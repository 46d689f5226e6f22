"""Does raydd's update equal the reference code's on the same inputs? Side by side, iteration by iteration.

Not a test: it imports the public reference repositories from ``--reference-root`` at run time (unmodified
clones; their commits are printed) and runs *their* distillation loop, then raydd's, on identical inputs:

- the same expert trajectory: farmed by raydd into a tiny digits store (ConvNet-3 w128, instance norm: the
  reference's ``ConvNet``) and handed to the reference as its ``replay_buffer_0.pt`` (raydd.store.reference_buffer);
- the same initial synthetic images, labels and step size α0 (the reference's draws, copied into raydd; for DATM
  its initial label logits too, after raydd's soft-label rule has been applied to the same images and compared);
- the same start epochs (the reference's, recorded from its log calls);
- the same student minibatches (the reference's ``torch.randperm`` draws, recorded; the reference takes the
  chunks of a permutation from its end, raydd from its head: the replay hands raydd the reference's order);
- the same DSA parameters (every ``torch.rand``/``torch.randint`` the reference's DiffAugment draws, recorded
  and replayed through raydd's own DSA operations).

Per iteration it prints the maximum relative difference (max |a - b| / max |b|) of the synthetic images, the
learned step size, DATM's label logits and the matching loss, and for DATM which iterations its threshold
skipped on each side. The reference's loop is adapted to this machine only from outside:
``wandb`` is a recording stub, ``get_dataset`` returns raydd's digits tensors, ``Tensor.cuda`` is the identity
on a CPU-only host (its iteration-0 image save calls it), DiffAugment's output is handed on in standard strides
(same values; see ``recording_augment``), ``--no-dsa`` is its own ``--no_aug`` switch (its ``--dsa False``
path fails at the evaluation print), and its evaluation runs zero networks.

    python benchmarks/reference_equivalence.py --reference-root /tmp/refs --methods mtt
    python benchmarks/reference_equivalence.py --reference-root /tmp/refs --methods mtt --no-dsa --batch-syn 10
    python benchmarks/reference_equivalence.py --reference-root /tmp/refs --methods datm --current-max-start-epoch 2

``--reference-root`` holds ``mtt-distillation/`` (GeorgeCazenavette/mtt-distillation), ``DATM/``
(NUS-HPC-AI-Lab/DATM; its utils/cfg.py needs ``pip install yacs``) and ``DatasetCondensation/``
(VICO-UoE/DatasetCondensation), ``tesla/`` (justincui03/tesla: raydd's MTT with ``unroll='tesla'``), ``DANCE/``
(Hansong-Zhang/DANCE: its DANCE.condense; its imports need ``pip install efficientnet_pytorch matplotlib``).
``PAD/`` (NUS-HPC-AI-Lab/PAD: its distill/PAD.py, DATM's loop with its parameter filter; raydd farms a plain
scorer expert and a pad_expert for it). EDC: ``EDC/`` (shaoshitong/EDC: its BNFeatureHook on raydd's observer;
``--edc-loop --data-root DIR``: its synthesis iteration on CIFAR-10; ``--methods --protocols edc``: its
train/direct_train.py evaluation; its recover/utils.py imports ``einops``).

    python benchmarks/reference_equivalence.py --reference-root /tmp/refs --methods pad [--pad-replay-selection]

``NCFM/`` (gszfwsb/NCFM: its match_loss, cailb_loss, compute_match_loss, compute_calib_loss, decode, DiffAug and
ConvNet, called in its Condenser's order; raydd farms a pool of pretrain experts with its settings).

    python benchmarks/reference_equivalence.py --reference-root /tmp/refs --methods ncfm [--smooth-relu]

    python benchmarks/reference_equivalence.py --reference-root /tmp/refs --methods dance [--dance-paper-steps]

DANCE: raydd's pre-trained experts are written as its ``premodel{i}_init/_trained.pth.tar`` state dicts; its
expert picks (``random.randint``), λ draws (``torch.rand``), each DiffAug call's normalised input (the class's
real batch) and numpy draws (its colour draws rounded to a 2^-12 grid, so that r − 0.5 is exact in float32
and float64 alike) are recorded and replayed into raydd's DANCE, which runs with ``step_per_class=True`` (the
code's loop) from the code's initial pixels; its CUDA defaults are the host's device.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raydd.data.augment.dsa import _SLOT_DTYPES, DSA, DSAConfig, DSADraw  # noqa: E402
from raydd.data.datasets import load_train_test  # noqa: E402
from raydd.farm import FarmSpec, farm  # noqa: E402
from raydd.methods import get_method, make_config  # noqa: E402
from raydd.methods.datm import ExpertLabeller, mean_correct_logits  # noqa: E402
from raydd.store import TrajectoryStore  # noqa: E402
from raydd.store.reference_buffer import expert_epochs, save_reference_buffer  # noqa: E402

REFERENCES = {"mtt": "mtt-distillation", "tesla": "tesla", "datm": "DATM", "pad": "PAD", "ncfm": "NCFM",
              "dm": "DatasetCondensation",
              "dance": "DANCE", "edc": "EDC"}
# digits upsampled to MNIST's 28 px: the references' ConvNet pads a one-channel input's first convolution by 3
# whatever its size (made for MNIST), raydd's only at 28x28 (the one size the references run one channel at).
RESOLUTION = 28


def commit_of(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        stamp = path / "COMMIT"
        return stamp.read_text().strip() if stamp.exists() else "unknown (not a git clone; put its commit in COMMIT)"


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / scale


# ----------------------------------------------------------------------------- recording the reference
class _Recorder:
    """What the reference run did: initial images and α, per-iteration images, α, loss, start epoch, the
    permutations it drew and each DiffAugment call's random draws."""

    def __init__(self) -> None:
        self.initial_images: torch.Tensor | None = None
        self.initial_labels: torch.Tensor | None = None  # DATM: the learnable label logits it starts from
        self.leaves: dict[str, torch.Tensor] = {}  # what its optimisers update, by kind
        self.images: list[torch.Tensor] = []
        self.syn_lr: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.skipped: list[bool] = []  # DATM: iterations above its threshold (no optimiser stepped)
        self.losses: list[float] = []
        self.starts: list[int] = []
        self.perms: list[torch.Tensor] = []
        self.dsa_calls: list[list[torch.Tensor]] = []
        self.nets: list[list[torch.Tensor]] = []  # DM: each iteration's freshly initialised embedder
        self.sorted: list[torch.Tensor] = []  # PAD: each iteration's ascending order of the parameters' errors


def _wandb_stub(record: _Recorder) -> types.ModuleType:
    wandb = types.ModuleType("wandb")
    wandb.config = types.SimpleNamespace(_items={})
    wandb.run = types.SimpleNamespace(name="reference")

    def init(config=None, **_):
        wandb.config._items = dict(vars(config))

    def log(values, step=None):
        if "Grand_Loss" in values:  # once per iteration, after the optimisers stepped (or did not: DATM's skip)
            record.losses.append(float(values["Grand_Loss"]))
            record.starts.append(int(values["Start_Epoch"]))
            record.skipped.append(len(record.images) < len(record.losses))
            for kind, leaf in record.leaves.items():  # a skipped iteration keeps the values it had
                if len(getattr(record, kind)) < len(record.losses):
                    getattr(record, kind).append(leaf.detach().clone())

    wandb.init, wandb.log, wandb.finish = init, log, lambda: None
    wandb.Histogram = wandb.Image = lambda *a, **k: None
    return wandb


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _recording_sgd(record: _Recorder) -> type:
    """torch.optim.SGD that records the tensor it is built on (images [N, C, H, W], α [], DATM's label logits
    [N, K]) and its value after each step."""
    kinds = {4: "images", 0: "syn_lr", 2: "labels"}

    class RecordingSGD(torch.optim.SGD):
        def __init__(self, params, **kw):
            params = list(params)
            super().__init__(params, **kw)
            self._leaf = params[0]
            self._kind = kinds[self._leaf.dim()]
            record.leaves[self._kind] = self._leaf
            if self._kind == "images":
                record.initial_images = self._leaf.detach().clone()
            elif self._kind == "labels":
                record.initial_labels = self._leaf.detach().clone()

        def step(self, closure=None):
            out = super().step(closure)
            getattr(record, self._kind).append(self._leaf.detach().clone())
            return out

    return RecordingSGD


def _recording_augment(reference_augment, record: _Recorder):
    """The reference's DiffAugment, recording every torch.rand/torch.randint it draws."""
    rand, randint = torch.rand, torch.randint

    def recording_augment(x, strategy="", seed=-1, param=None):
        drawn: list[torch.Tensor] = []

        def rec(fn):
            def wrapped(*a, **k):
                out = fn(*a, **k)
                drawn.append(out.detach().clone())
                return out
            return wrapped

        with _patched(torch, "rand", rec(rand)), _patched(torch, "randint", rec(randint)):
            out = reference_augment(x, strategy, seed=seed, param=param)
        record.dsa_calls.append(drawn)
        # A one-channel crop leaves strides that today's torch reads as channels-last, and the reference's
        # ``out.view`` then fails: the same values in standard strides (the reference's torch behaved so).
        return out.clone(memory_format=torch.contiguous_format)

    return recording_augment


def _reference_patches(stack: contextlib.ExitStack, record: _Recorder) -> None:
    """What every reference run gets: recording SGD, no stdout, Tensor.cuda as the identity without a GPU."""
    stack.enter_context(_patched(torch.optim, "SGD", _recording_sgd(record)))
    if not torch.cuda.is_available():  # MTT's iteration-0 save calls image_syn.cuda()
        stack.enter_context(_patched(torch.Tensor, "cuda", lambda self, *a, **k: self))
    stack.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))


@contextlib.contextmanager
def _restored_env(name: str):
    old = os.environ.get(name)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _import_reference(root: Path, module: str, where: str = ""):
    """``module`` from ``root/where``, with ``root`` importable too (DATM's distill/DATM.py imports utils.*)."""
    for name in list(sys.modules):  # each reference has its own utils/networks
        if name.split(".")[0] in ("utils", "networks", "reparam_module", module):
            sys.modules.pop(name)
    paths = [str(root / where), str(root)] if where else [str(root)]
    sys.path[:0] = paths
    try:
        return __import__(module)
    finally:
        for path in paths:
            sys.path.remove(path)


def _recording_sort(record: _Recorder):
    """PAD.py's one torch.sort per iteration (the per-parameter errors, ascending): its order recorded."""
    sort = torch.sort

    def recording_sort(*a, **k):
        out = sort(*a, **k)
        record.sorted.append(out.indices.clone())
        return out

    return recording_sort


def _recording_randperm(record: _Recorder):
    randperm = torch.randperm

    def recording_randperm(*a, **k):
        out = randperm(*a, **k)
        record.perms.append(out.clone())
        return out

    return recording_randperm


def _digits_dataset(train):
    """The reference's get_dataset (MTT's and DATM's 12 values) returning raydd's digits tensors."""
    info = train.info

    def get_dataset(*_a, **_k):
        identity = {c: c for c in range(info.num_classes)}
        return (info.channels, tuple(info.resolution), info.num_classes, list(range(info.num_classes)), None, None,
                _TrainView(train), None, None, None, identity, identity)

    return get_dataset


class _TrainView(torch.utils.data.Dataset):
    def __init__(self, train) -> None:
        self.train = train

    def __len__(self):
        return len(self.train.labels)

    def __getitem__(self, i):
        return self.train.images[i], int(self.train.labels[i])


def run_reference_mtt(root: Path, buffer_root: Path, train, args, record: _Recorder, **extra) -> None:
    """mtt-distillation's distill.main (or TESLA's, whose distill.py is MTT's with its Eq. 6 gradient:
    ``extra`` its two added options) on raydd's digits tensors and expert buffer, recording what it does."""
    sys.modules["wandb"] = _wandb_stub(record)
    distill = _import_reference(root, "distill")
    ns = argparse.Namespace(
        dataset="digits", subset="", model="ConvNet", res=0, ipc=args.ipc, eval_mode="S", num_eval=0,
        eval_it=10 ** 9, epoch_eval_train=0, Iteration=args.iterations - 1, lr_img=args.lr_img, lr_lr=args.lr_lr,
        lr_teacher=args.syn_lr_init, lr_init=args.syn_lr_init, batch_real=256, batch_syn=args.batch_syn,
        batch_train=256, pix_init="real", dsa="True", dsa_strategy=args.dsa_strategy,
        data_path="", buffer_path=str(buffer_root), expert_epochs=args.expert_epochs, syn_steps=args.syn_steps,
        max_start_epoch=args.max_start_epoch, zca=False, load_all=False, no_aug=not args.dsa, texture=False,
        canvas_size=2, canvas_samples=1, max_files=None, max_experts=None, force_save=False, **extra)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(distill, "get_dataset", _digits_dataset(train)))
        stack.enter_context(_patched(distill, "DiffAugment", _recording_augment(distill.DiffAugment, record)))
        stack.enter_context(_patched(torch, "randperm", _recording_randperm(record)))
        _reference_patches(stack, record)
        distill.main(ns)


def run_reference_datm(root: Path, buffer_root: Path, train, args, record: _Recorder, module: str = "DATM",
                       **extra) -> None:
    """NUS-HPC-AI-Lab/DATM's distill/DATM.py main on raydd's digits tensors and expert buffer, from its own
    config defaults (utils/cfg.py) with this run's settings: ``samples_predicted_correctly`` initialisation (its
    ``parall_eva`` on, so that it runs on the host's device instead of cuda:0), soft labels, the threshold.
    PAD (NUS-HPC-AI-Lab/PAD) is DATM's loop with its parameter filter: ``module="PAD"`` runs its distill/PAD.py
    the same way, ``extra`` its settings (loss_ratio, and loss_threshold_low, which PAD.py reads but its cfg
    does not define)."""
    sys.modules["wandb"] = _wandb_stub(record)
    datm = _import_reference(root, module, "distill")
    settings = dict(datm.cfg)  # the reference's own defaults (yacs CfgNode), as its --cfg parser starts from
    settings.update(
        dataset="digits", model="ConvNet", ipc=args.ipc, device=[0], num_eval=0, eval_it=10 ** 9, skip_first_eva=True,
        Iteration=args.iterations - 1, lr_img=args.lr_img, lr_lr=args.lr_lr, lr_teacher=args.syn_lr_init,
        lr_y=args.lr_y, Momentum_y=0.9, threshold=args.threshold, batch_syn=args.batch_syn, dsa=True,
        dsa_strategy=args.dsa_strategy, no_aug=not args.dsa, buffer_path=str(buffer_root), zca=False,
        expert_epochs=args.expert_epochs, syn_steps=args.syn_steps, min_start_epoch=0,
        max_start_epoch=args.max_start_epoch, Sequential_Generation=args.current_max_start_epoch is not None,
        current_max_start_epoch=args.current_max_start_epoch or args.max_start_epoch,
        expansion_end_epoch=args.expansion_end_epoch, pix_init="samples_predicted_correctly", parall_eva=True,
        load_all=False, max_files=None, max_experts=None, Label_Model_Timestamp=-1, **extra)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(datm, "manual_seed", lambda seed=0: None))  # seeded above, with args.seed
        stack.enter_context(_patched(datm, "get_dataset", _digits_dataset(train)))
        stack.enter_context(_patched(datm, "DiffAugment", _recording_augment(datm.DiffAugment, record)))
        stack.enter_context(_patched(torch, "randperm", _recording_randperm(record)))
        stack.enter_context(_restored_env("CUDA_VISIBLE_DEVICES"))  # it sets it from its --device
        if module == "PAD":
            stack.enter_context(_patched(torch, "sort", _recording_sort(record)))
        _reference_patches(stack, record)
        datm.main(argparse.Namespace(**settings))


def run_reference_dm(root: Path, work: Path, train, args, record: _Recorder) -> None:
    """DatasetCondensation's main_DM.main on raydd's digits tensors (zero evaluation networks), recording the
    embedder each iteration draws, the real images it picks (np.random.permutation), the images and the loss.
    Without DSA: its siamese DiffAugment fails on today's torch (``randf[:] = randf[0]`` writes a tensor into
    itself); MTT's run replays the same augmentation code non-siamese."""
    main_dm = _import_reference(root, "main_DM")
    info = train.info

    def get_dataset(*_a, **_k):
        return (info.channels, tuple(info.resolution), info.num_classes, list(range(info.num_classes)),
                [0.0] * info.channels, [1.0] * info.channels, _TrainView(train), None, None)

    get_network = main_dm.get_network

    def recording_get_network(*a, **k):
        net = get_network(*a, **k)
        record.nets.append([p.detach().clone() for p in net.parameters()])
        return net

    permutation = np.random.permutation

    def recording_permutation(x, *a, **k):
        out = permutation(x, *a, **k)
        record.perms.append(torch.as_tensor(np.asarray(out)))
        return out

    backward = torch.Tensor.backward

    def recording_backward(self, *a, **k):
        if self.dim() == 0:
            record.losses.append(float(self))
        return backward(self, *a, **k)

    argv = ["main_DM.py", "--dataset", "digits", "--model", "ConvNet", "--ipc", str(args.ipc), "--eval_mode", "S",
            "--num_exp", "1", "--num_eval", "0", "--Iteration", str(args.iterations - 1), "--lr_img", str(args.lr_img_dm),
            "--batch_real", str(args.batch_real), "--init", "real", "--dsa_strategy", "none",
            "--data_path", str(work / "data"), "--save_path", str(work / "result")]
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(sys, "argv", argv))
        stack.enter_context(_patched(main_dm, "get_dataset", get_dataset))
        stack.enter_context(_patched(main_dm, "get_network", recording_get_network))
        stack.enter_context(_patched(np.random, "permutation", recording_permutation))
        stack.enter_context(_patched(torch.Tensor, "backward", recording_backward))
        _reference_patches(stack, record)
        main_dm.main()


# ----------------------------------------------------------------------------- replaying into raydd
class _Replay:
    """The reference's recorded draws handed out in order — and again, the same ones, when raydd re-runs steps
    from a restored generator (the checkpointed and first-order unrolls replay their steps in the backward
    pass): each request draws a key from the caller's generator, and a key seen before gets its draw again."""

    def __init__(self, draws: list) -> None:
        self.draws, self.seen = list(draws), {}

    def next(self, generator: torch.Generator | None):
        if generator is None:
            return self.draws.pop(0)
        key = int(torch.randint(2 ** 62, (1,), generator=generator))
        if key not in self.seen:
            self.seen[key] = self.draws.pop(0)
        return self.seen[key]

    def __len__(self) -> int:
        return len(self.draws)


class _ReplayDSA:
    """raydd's DSA operations applied with the reference's recorded draws, one DiffAugment call at a time."""

    def __init__(self, calls: list[list[torch.Tensor]], strategy: str, config: DSAConfig) -> None:
        # ``config``: the method's own DSA config (e.g. its align_corners), with the reference's whole strategy
        # (raydd drops flip on digits; the reference keeps it on every dataset)
        self.calls = _Replay(calls)
        self.strategy = strategy.split("_")
        self.dsa = DSA(dataclasses.replace(config, strategy=strategy))
        self.ops = self.dsa.ops

    def __call__(self, x, seed=None, generator=None):
        drawn = self.calls.next(generator)
        op = self.strategy[int(drawn[0])]
        slots = _SLOT_DTYPES[op]  # raydd's values of the op, in the order the reference draws them
        if len(drawn) - 1 != len(slots):
            raise RuntimeError(f"reference DiffAugment drew {len(drawn) - 1} values for {op}, raydd's {op} takes "
                               f"{len(slots)}")
        values = [v.reshape(-1).to(dtype) for v, dtype in zip(drawn[1:], slots)]
        if seed is not None:  # a siamese call: the reference uses its draws' first entry for the whole batch
            values = [v[:1] for v in values]
        # In standard strides, as the reference side's output (recording_augment): a one-channel crop's strides
        # otherwise send the convolution down another kernel, whose float32 rounding the unroll amplifies.
        return self.dsa.apply(x, DSADraw((op,), {op: tuple(values)})).clone(memory_format=torch.contiguous_format)


def run_raydd_matching(name: str, store, train, args, record: _Recorder) -> dict[str, list[float]]:
    """raydd's MTT (TESLA: MTT with unroll='tesla') or DATM from the reference's initial images (and DATM's label
    logits), replaying its start epochs, minibatches and DSA draws; per iteration the relative differences from
    the reference's values."""
    knobs = dict(unroll="tesla") if name == "tesla" else {}
    lr_img = args.lr_img
    if name == "tesla" and args.tesla_as_released:
        # TESLA's distill.py writes `2 * torch.autograd.grad(...)`: a tuple doubled, not the gradient, so it steps
        # its images by half of Eq. 6's gradient; raydd's unroll='tesla' takes the whole gradient: lr_img / 2 on
        # raydd's side moves the images as the released code does
        lr_img = args.lr_img / 2
    name = "mtt" if name == "tesla" else name
    knobs.update(syn_steps=args.syn_steps, expert_epochs=args.expert_epochs, max_start_epoch=args.max_start_epoch,
                 lr_img=lr_img, lr_lr=args.lr_lr, syn_lr_init=args.syn_lr_init, dsa=args.dsa,
                 dsa_strategy=args.dsa_strategy, batch_syn=args.batch_syn, dsa_align_corners=args.align_corners)
    if name in ("datm", "pad"):
        knobs.update(lr_y=args.lr_y, threshold=args.threshold, current_max_start_epoch=args.current_max_start_epoch,
                     expansion_end_epoch=args.expansion_end_epoch, min_start_epoch=0)
    if name == "pad":
        knobs.update(loss_ratio=args.pad_loss_ratio, param_selection="loss", score_models=1, score_epoch=1)
    cfg = make_config(name, "digits", args.ipc, **knobs)
    method = get_method(name)(cfg, train, store, device="cpu", seed=args.seed)
    (expert,) = method.experts
    rows: dict[str, list[float]] = {"images": [], "syn_lr": [], "labels": [], "loss": []}
    if name in ("datm", "pad"):  # raydd's soft-label rule (the experts' mean correct logits) on the reference's images
        labeller = ExpertLabeller(method, cfg.label_epoch)
        ours = mean_correct_logits(method, labeller, record.initial_images, method.labels.classes)
        rows["label_init"] = [max_rel(ours, record.initial_labels)]
    with torch.no_grad():
        method.images.copy_(record.initial_images)
        if name in ("datm", "pad"):
            method.labels.logits.copy_(record.initial_labels)
    starts = list(record.starts)

    def replay_segment():  # the reference's start epoch on the one expert both sides read
        t = starts.pop(0)
        return t, method.expert_params(expert.trajectory_id, t), method.expert_params(expert.trajectory_id, t + cfg.expert_epochs)

    method.sample_segment = replay_segment
    perms = _Replay(record.perms)

    def replay_minibatch(n_syn, generator, pending):
        if not pending:
            chunks = list(perms.next(generator).split(min(cfg.batch_syn or n_syn, n_syn)))
            pending.extend(reversed(chunks))  # the reference pops its chunks from the end
        return pending.pop(0)

    method._next_minibatch = replay_minibatch
    kept_here: list[torch.Tensor] = []
    if name == "pad":  # the parameters raydd's loss keeps, per iteration (to set beside the reference's)
        import raydd.methods.pad as pad_module

        kept = pad_module.kept_parameters

        def recording_kept(*a, **k):
            out = kept(*a, **k)
            kept_here.append(out.clone())
            if args.pad_replay_selection:  # the reference's kept parameters (its sort of its own errors)
                theirs = record.sorted[len(kept_here) - 1]
                return theirs[int(args.pad_loss_ratio * theirs.numel()):]
            return out

        pad_module.kept_parameters = recording_kept
    if args.dsa:
        method.dsa = _ReplayDSA(record.dsa_calls, args.dsa_strategy, method.dsa.config)
    rows["skipped"] = []
    for i in range(args.iterations):
        metrics = method.step()
        rows["images"].append(max_rel(method.images, record.images[i]))
        rows["syn_lr"].append(max_rel(method.syn_lr, record.syn_lr[i]))
        rows["labels"].append(max_rel(method.labels.logits, record.labels[i]) if name in ("datm", "pad")
                              else float("nan"))
        rows["loss"].append(abs(metrics["loss"] - record.losses[i]) / abs(record.losses[i]))
        rows["skipped"].append(bool(metrics["skipped"]) == record.skipped[i])
    if name == "pad":
        pad_module.kept_parameters = kept
        drop = int(args.pad_loss_ratio * record.sorted[0].numel())
        rows["kept_differ"] = [len(set(ours.tolist()) ^ set(theirs[drop:].tolist()))
                               for ours, theirs in zip(kept_here, record.sorted)]
    return rows


def run_raydd_dm(train, args, record: _Recorder) -> dict[str, list[float]]:
    from raydd.models import build_model

    cfg = make_config("dm", "digits", args.ipc, lr_img=args.lr_img_dm, batch_real=args.batch_real, dsa=False)
    method = get_method("dm")(cfg, train, device="cpu", seed=args.seed)
    with torch.no_grad():
        method.images.copy_(record.initial_images)
    nets = list(record.nets)
    # main_DM.py's permutations: the IPC-image initialisation per class first, then a real batch per class
    batches = list(record.perms[train.info.num_classes:])

    def embedder(generator):
        net = build_model(method.model_spec).train()
        with torch.no_grad():  # the reference's ConvNet: the same tensors in the same order
            for mine, theirs in zip(net.parameters(), nets.pop(0), strict=True):
                mine.copy_(theirs)
                mine.requires_grad_(False)
        return net

    def class_batch(c, generator):
        return train.images[batches.pop(0)[:cfg.batch_real]], None

    method._embedder, method._draw_class_batch = embedder, class_batch
    rows = {"images": [], "syn_lr": [], "loss": []}
    for i in range(args.iterations):
        metrics = method.step()
        rows["images"].append(max_rel(method.images, record.images[i]))
        rows["syn_lr"].append(float("nan"))
        rows["loss"].append(abs(metrics["loss"] - record.losses[i]) / abs(record.losses[i]))
    rows["labels"] = [float("nan")] * args.iterations
    return rows


# ----------------------------------------------------------------------------- DANCE
@dataclasses.dataclass
class _DanceRecord:
    """What DANCE's condense did: its experts and λ draws, each DiffAugment call's (normalised) input and numpy
    draws, each class's loss and the images after each of its per-class steps."""

    experts: list[int] = dataclasses.field(default_factory=list)
    lams: list[float] = dataclasses.field(default_factory=list)
    aug_calls: list[tuple[torch.Tensor, list[float], list[int]]] = dataclasses.field(default_factory=list)
    match_losses: list[float] = dataclasses.field(default_factory=list)
    calib_losses: list[float] = dataclasses.field(default_factory=list)
    reals: list[torch.Tensor] = dataclasses.field(default_factory=list)  # NCFM: each class's real batch (indices)
    frequencies: list[torch.Tensor] = dataclasses.field(default_factory=list)  # NCFM: each class's t
    grads: list[torch.Tensor] = dataclasses.field(default_factory=list)  # NCFM: the gradient at each AdamW step


def _dance_state_dict(reference_model, flat: torch.Tensor, spec) -> dict:
    """raydd's flat ConvNet parameters as IDC's ConvNet state dict (its layers.conv.d / layers.norm.d /
    classifier, raydd's features.k order: conv, norm per block)."""
    from raydd.models import build_model
    from raydd.models.flat import ParamLayout

    mine = ParamLayout.of_parameters(build_model(spec)).unflatten(flat)
    convs = sorted({int(n.split(".")[1]) for n, t in mine.items() if n.startswith("features") and t.dim() == 4})
    out = {}
    for d, k in enumerate(convs):
        out[f"layers.conv.{d}.weight"], out[f"layers.conv.{d}.bias"] = mine[f"features.{k}.weight"], mine[f"features.{k}.bias"]
        out[f"layers.norm.{d}.weight"] = mine[f"features.{k + 1}.weight"]
        out[f"layers.norm.{d}.bias"] = mine[f"features.{k + 1}.bias"]
    out["classifier.weight"], out["classifier.bias"] = mine["classifier.weight"], mine["classifier.bias"]
    want = reference_model.state_dict()
    if set(want) != set(out) or any(want[k].shape != v.shape for k, v in out.items()):
        raise RuntimeError(f"raydd's ConvNet does not map onto DANCE's: {sorted(want)} vs {sorted(out)}")
    return {k: v.detach().clone().reshape(want[k].shape) for k, v in out.items()}


def run_reference_dance(root: Path, work: Path, experts, spec, train, args, record: _Recorder) -> _DanceRecord:
    """Hansong-Zhang/DANCE's DANCE.condense on raydd's digits (as pixels, its parameterisation) and raydd's
    pre-trained experts (written as its premodel{i}_init/_trained state dicts), recording its draws."""
    info = train.info
    for name in list(sys.modules):  # DANCE's modules share names with the others' and the standard library's
        if name.split(".")[0] in ("test", "data", "common", "misc", "models", "train", "DANCE"):
            sys.modules.pop(name)
    tensor = torch.tensor

    def host_tensor(*a, device=None, **k):  # its train.py builds CUDA tensors at import time
        return tensor(*a, **k)

    with _patched(torch, "tensor", host_tensor):
        dance = _import_reference(root, "DANCE")
    common, data, augment = sys.modules["common"], sys.modules["data"], sys.modules["misc.augment"]
    dance_record = _DanceRecord()
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    pixels = train.images * std + mean
    trainset = data.TensorDataset(pixels, train.labels)
    trainset.nclass = info.num_classes
    ns = argparse.Namespace(
        dataset="digits", net_type="convnet", depth=3, width=1.0, norm_type="instance", nch=info.channels,
        size=RESOLUTION, ipc=args.ipc, factor=args.dance_factor, decode_type="single", init="mix",
        aug_type="color_crop_cutout", mixup="vanilla", load_memory=True, batch_real=args.batch_real, workers=0,
        lr_img=args.lr_img_dance, mom_img=0.5, niter=args.iterations, iter_calib=1, batch_syn_max=200,
        num_premodel=len(experts), pretrain_dir=str(work / "premodels"), save_dir=str(work / "dance"), test=False,
        time=False)
    (work / "premodels").mkdir(parents=True, exist_ok=True)
    (work / "dance").mkdir(parents=True, exist_ok=True)
    probe = dance.define_model(ns, info.num_classes)
    for i, expert in enumerate(experts):
        torch.save(_dance_state_dict(probe, expert.initial, spec), work / "premodels" / f"premodel{i}_init.pth.tar")
        torch.save(_dance_state_dict(probe, expert.final, spec), work / "premodels" / f"premodel{i}_trained.pth.tar")

    call = augment.DiffAug.__call__

    def recording_call(self, x, *a, **k):
        uniforms, ints = [], []
        uniform, randint = np.random.uniform, np.random.randint

        def rec(fn, into):
            def wrapped(*aa, **kk):
                out = fn(*aa, **kk)
                into.append(out)
                return out
            return wrapped

        def dyadic_uniform(*aa, **kk):
            # its colour draws on a 2^-12 grid: r − 0.5, r·2 and r + 0.5 are then exact in float32 and float64,
            # so raydd's ops (which take the draw to float32 first) compute the same numbers as its (float64)
            return np.float64(np.round(uniform(*aa, **kk) * 4096) / 4096)

        with _patched(np.random, "uniform", rec(dyadic_uniform, uniforms)), \
                _patched(np.random, "randint", rec(randint, ints)):
            out = call(self, x, *a, **k)
        dance_record.aug_calls.append((x.detach().clone(), uniforms, ints))
        return out

    randint, rand = random.randint, torch.rand

    def recording_randint(*a, **k):
        out = randint(*a, **k)
        dance_record.experts.append(out)
        return out

    def recording_rand(*a, **k):
        out = rand(*a, **k)
        dance_record.lams.append(float(out))
        return out

    innerloss, interloss = dance.innerloss, dance.interloss

    def recording_inner(*a):
        loss = innerloss(*a)
        dance_record.match_losses.append(float(loss))
        return loss

    def recording_inter(*a):
        loss = interloss(*a)
        dance_record.calib_losses.append(float(loss))
        return loss

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(dance, "load_resized_data", lambda _args: (trainset, None)))
        stack.enter_context(_patched(dance, "save_img", lambda *a, **k: None))
        stack.enter_context(_patched(dance.Synthesizer, "test", lambda *a, **k: None))
        # its CUDA defaults, as the host's device
        stack.enter_context(_patched(dance.Synthesizer.__init__, "__defaults__", ("cpu",)))
        stack.enter_context(_patched(data.ClassMemDataLoader.__init__, "__defaults__", (False, "cpu")))
        stack.enter_context(_patched(common.diffaug, "__defaults__", ("cpu",)))
        stack.enter_context(_patched(data, "MEANS", {**data.MEANS, "digits": list(info.mean)}))
        stack.enter_context(_patched(data, "STDS", {**data.STDS, "digits": list(info.std)}))
        stack.enter_context(_patched(common, "MEANS", {**common.MEANS, "digits": list(info.mean)}))
        stack.enter_context(_patched(common, "STDS", {**common.STDS, "digits": list(info.std)}))
        stack.enter_context(_patched(augment.DiffAug, "__call__", recording_call))
        stack.enter_context(_patched(random, "randint", recording_randint))
        stack.enter_context(_patched(torch, "rand", recording_rand))
        stack.enter_context(_patched(dance, "innerloss", recording_inner))
        stack.enter_context(_patched(dance, "interloss", recording_inter))
        _reference_patches(stack, record)
        dance.condense(ns, lambda *a, **k: None, device="cpu")
    return dance_record


class _ReplayDiffAug:
    """raydd's DSA operations (color, crop, cutout: every op on every call) with the numpy draws of DANCE's
    batch-mode DiffAug, one recorded call per siamese seed: the real and the synthetic batch of a class share
    one call there (one concatenated batch) and one seed in raydd."""

    def __init__(self, calls: list, config: DSAConfig) -> None:
        self.calls, self.by_seed = list(calls), {}
        self.dsa = DSA(dataclasses.replace(config, strategy="color_crop_cutout", single_per_call=False))

    def __call__(self, x, seed=None, generator=None):
        if seed not in self.by_seed:
            _, uniforms, ints = self.calls.pop(0)
            # brightness, saturation, contrast; then crop's single-op choice (always 0), its two shifts; cutout's two
            values = {"color": tuple(torch.tensor([float(u)], dtype=torch.float64) for u in uniforms),
                      "crop": tuple(torch.tensor([int(v)]) for v in ints[1:3]),
                      "cutout": tuple(torch.tensor([int(v)]) for v in ints[3:5])}
            self.by_seed[seed] = DSADraw(("color", "crop", "cutout"), values)
        return self.dsa.apply(x, self.by_seed[seed])


def raydd_dance(store, train, args):
    """raydd's DANCE with the reference's settings; ``step_per_class=True`` (the code's loop) unless
    ``--dance-paper-steps``."""
    cfg = make_config("dance", "digits", args.ipc, factor=args.dance_factor, lr_img=args.lr_img_dance,
                      img_momentum=0.5, num_experts=args.dance_experts, batch_real=args.batch_real, batch_syn_max=200,
                      step_per_class=not args.dance_paper_steps, embed_classes_together=False)
    return get_method("dance")(cfg, train, store, device="cpu", seed=args.seed)


def _replay_pool(method, record: _DanceRecord, blend: str) -> None:
    """The reference's expert picks and blend weights (DANCE's λ, NCFM's l) into ``method`` and its ``blend``
    function (the mid encoder / the extractor)."""
    experts, weights = list(record.experts), list(record.lams)
    method.rng = types.SimpleNamespace(randrange=lambda n: experts.pop(0))
    own = getattr(method, blend)
    setattr(method, blend, lambda expert, weight: own(expert, weights.pop(0)))


def run_raydd_dance(method, train, args, record: _Recorder, dance_record: _DanceRecord) -> dict[str, list[float]]:
    """raydd's DANCE from the reference's initial pixels, replaying its experts, λ draws, real batches and
    DiffAug draws; per iteration the relative differences of the images (after the iteration's last step)
    and of the two losses (the larger)."""
    with torch.no_grad():
        method.images.copy_(record.initial_images)
    _replay_pool(method, dance_record, "mid_encoder")
    k = train.info.num_classes
    calls = dance_record.aug_calls
    # the matching calls' real halves, class by class (a calibration call augments synthetic images only)
    per_iteration = 2 * k
    reals = [calls[i * per_iteration + c][0][:args.batch_real] for i in range(args.iterations) for c in range(k)]
    method._real_batch = lambda c, generator: reals.pop(0)
    method.dsa = _ReplayDiffAug(calls, method.dsa.config)
    rows: dict[str, list[float]] = {"images": [], "syn_lr": [], "labels": [], "loss": []}
    for i in range(args.iterations):
        metrics = method.step()
        theirs = record.images[(i + 1) * per_iteration - 1]
        rows["images"].append(max_rel(method.images, theirs))
        match = sum(dance_record.match_losses[i * k:(i + 1) * k])
        calib = sum(dance_record.calib_losses[i * k:(i + 1) * k])
        if args.dance_paper_steps:  # Eq. 5's mean over all images: the code's per-class means averaged
            calib /= k
        rows["loss"].append(max(abs(metrics["pltda_loss"] - match) / abs(match),
                                abs(metrics["calib_loss"] - calib) / abs(calib)))
    rows["syn_lr"] = rows["labels"] = [float("nan")] * args.iterations
    return rows


# ----------------------------------------------------------------------------- NCFM
def run_reference_ncfm(root: Path, experts, spec, train, args) -> tuple[_DanceRecord, list[torch.Tensor]]:
    """gszfwsb/NCFM's per-iteration work on raydd's digits (as pixels) and raydd's pool experts, from its own
    modules: its ConvNet (models/convnet.py) loaded with the experts' weights, its ``match_loss`` and
    ``cailb_loss`` (NCFM/NCFM.py) with its ``CFLossFunc``, its ``compute_match_loss`` / ``compute_calib_loss``
    (condenser/compute_loss.py: the per-class AdamW steps), its ``decode`` and its batch-mode DiffAug after its
    Normalize. Its Condenser.condense (which needs torch.distributed, CUDA and files on disk) is the one part not
    run: the harness calls those functions in its order per iteration — pick a pool model and blend it with
    l ~ U(0, 1), clamp the pixels to [0, 1], match every class, calibrate every class, step the plateau schedule —
    decoding synchronously (the code decodes in a background thread, its values up to ~10 steps stale). Its
    real batches are random ones recorded here (the code's loader always returns each class's first 1024)."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("models", "NCFM", "condenser", "utils", "data"):
            sys.modules.pop(name)
    import importlib

    sys.path.insert(0, str(root))
    try:
        convnet, ncfm = importlib.import_module("models.convnet"), importlib.import_module("NCFM.NCFM")
        compute = importlib.import_module("condenser.compute_loss")
        decode = importlib.import_module("condenser.decode").decode
        diffaug, augment = importlib.import_module("utils.diffaug"), importlib.import_module("data.augment")
    finally:
        sys.path.remove(str(root))
    info, k = train.info, train.info.num_classes
    record, images_after = _DanceRecord(), []
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    pixels = train.images * std + mean

    def net():
        return convnet.ConvNet(k, net_norm="instance", net_depth=3, net_width=128, channel=info.channels,
                               im_size=(RESOLUTION, RESOLUTION))

    model_interval, model_final = net(), net()
    normalize = augment.Normalize(list(info.mean), list(info.std))
    batch_aug = diffaug.DiffAug(strategy="color_crop_cutout", batch=True)
    uniform, randint = np.random.uniform, np.random.randint

    def aug_fn(x):
        uniforms, ints = [], []

        def dyadic_uniform(*aa, **kk):  # as for DANCE: colour draws on a 2^-12 grid, exact in float32 and 64
            out = np.float64(np.round(uniform(*aa, **kk) * 4096) / 4096)
            uniforms.append(out)
            return out

        def rec_randint(*aa, **kk):
            out = randint(*aa, **kk)
            ints.append(out)
            return out

        z = normalize(x)
        with _patched(np.random, "uniform", dyadic_uniform), _patched(np.random, "randint", rec_randint):
            out = batch_aug(z)
        record.aug_calls.append((z.detach().clone(), uniforms, ints))
        return out

    data = args.ncfm_initial.clone().requires_grad_(True)
    optim = torch.optim.AdamW([data], lr=args.ncfm_lr, weight_decay=5e-4)
    adamw_step = optim.step

    def recording_step(*a, **kw):
        record.grads.append(data.grad.detach().clone())
        return adamw_step(*a, **kw)

    optim.step = recording_step
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optim, mode="min", factor=0.5, patience=500)
    ipc = args.ipc
    gen = torch.Generator().manual_seed(args.seed + 7)

    class Loader:
        def class_sample(self, c):
            idx = train.class_indices(c)
            picks = idx[torch.randperm(len(idx), generator=gen)[:args.batch_real]]
            record.reals.append(picks)
            return pixels[picks], train.labels[picks]

    def sample_fn(c):
        return decode("single", (RESOLUTION, RESOLUTION), data[c * ipc:(c + 1) * ipc],
                      torch.full((ipc,), c, dtype=torch.long), args.dance_factor)

    frequencies = []
    randn = torch.randn

    def recording_randn(*a, **kw):  # CFLossFunc's t = torch.randn(num_freqs, D)
        out = randn(*a, **kw)
        frequencies.append(out.clone())
        return out

    cf = ncfm.CFLossFunc(alpha_for_loss=0.5, beta_for_loss=0.5)
    ns = types.SimpleNamespace(device="cpu", cf_loss_func=cf, num_freqs=args.ncfm_freqs)
    timing = types.SimpleNamespace(start_step=lambda: None, record=lambda name: None)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    for _ in range(args.iterations):
        e = random.randint(0, len(experts) - 1)
        lam = float(torch.rand(1))
        record.experts.append(e)
        record.lams.append(lam)
        init = _dance_state_dict(model_interval, experts[e].initial, spec)
        final = _dance_state_dict(model_interval, experts[e].final, spec)
        model_interval.load_state_dict({n: lam * init[n] + (1 - lam) * final[n] for n in init})
        model_final.load_state_dict(final)
        with torch.no_grad():
            data.clamp_(0.0, 1.0)
        with _patched(torch, "randn", recording_randn):
            match, _ = compute.compute_match_loss(ns, Loader(), sample_fn, aug_fn, ncfm.match_loss, optim, range(k),
                                                  timing, model_interval, None)
        calib, _ = compute.compute_calib_loss(sample_fn, aug_fn, ncfm.cailb_loss, optim, 1, range(k), timing,
                                              model_final, 1.0, None)
        scheduler.step((match + calib) / k)
        record.match_losses.append(match)
        record.calib_losses.append(calib)
        images_after.append(data.detach().clone())
    record.frequencies = frequencies
    return record, images_after


def run_raydd_ncfm(store, train, args) -> dict[str, list[float]]:
    """raydd's NCFM (``step_per_class``, the code's loop) from the same initial pixels, replaying the reference's
    pool picks, l draws, real batches, t draws and DiffAug draws; per iteration the relative differences of the
    pixels and of the two losses (the larger)."""
    cfg = make_config("ncfm", "digits", args.ipc, factor=args.dance_factor, num_experts=args.dance_experts,
                      batch_real=args.batch_real, num_freqs=args.ncfm_freqs, lr_img=args.ncfm_lr,
                      embed_classes_together=False)
    method = get_method("ncfm")(cfg, train, store, device="cpu", seed=args.seed)
    args.ncfm_initial = method.images.detach().clone()
    record, images_after = run_reference_ncfm(args.reference_root / REFERENCES["ncfm"], method.experts,
                                              method.model_spec, train, args)
    with torch.no_grad():
        method.images.copy_(args.ncfm_initial)
    _replay_pool(method, record, "extractor")
    reals, frequencies = list(record.reals), list(record.frequencies)
    method._real_batch = lambda c, generator: train.images[reals.pop(0)]
    draw_class = type(method).__mro__[1]._draw_class  # PretrainedDM's draws, then the reference's t

    def replay_draw(c, generator, keep_reals):
        out = draw_class(method, c, generator, keep_reals)
        method._frequencies.append(frequencies.pop(0))
        return out

    method._draw_class = replay_draw
    method.dsa = _ReplayDiffAug(record.aug_calls, method.dsa.config)
    ours_grads, adamw_step = [], method.optimizer.step

    def recording_step(*a, **kw):
        ours_grads.append(method.images.grad.detach().clone())
        return adamw_step(*a, **kw)

    method.optimizer.step = recording_step
    rows: dict[str, list[float]] = {"images": [], "loss": []}
    for i in range(args.iterations):
        metrics = method.step()
        rows["images"].append(max_rel(method.images, images_after[i]))
        rows["loss"].append(max(abs(metrics["match_loss"] - record.match_losses[i]) / abs(record.match_losses[i]),
                                abs(metrics["calib_loss"] - record.calib_losses[i]) / abs(record.calib_losses[i])))
    print(f"  pool picks {record.experts}, l {[round(v, 4) for v in record.lams]}, {len(record.aug_calls)} DiffAug "
          f"calls and {len(record.frequencies)} t draws ({args.ncfm_freqs} x D) replayed; reference match loss "
          f"{record.match_losses[0]:.6g} -> {record.match_losses[-1]:.6g}")
    k = train.info.num_classes
    first = [max_rel(a, b) for a, b in zip(ours_grads[:2 * k], record.grads[:2 * k])]
    print(f"  iteration 1, the gradient at each of its {2 * k} AdamW steps (max relative difference): "
          f"matching {max(first[:k]):.1e} (first class {first[0]:.1e}), calibration {max(first[k:]):.1e}")
    return rows


# ----------------------------------------------------------------------------- EDC
def _edc_hooks(utils, bns, work: Path, momentum: float, tag: str = "bn") -> list:
    """The code's ``BNFeatureHook`` on each BatchNorm layer, as recover.py configures it (``category_aware``
    'global'); a hook whose statistics were saved under ``work`` loads them."""
    return [utils.BNFeatureHook(bn, save_path=str(work / "statistic"), name=f"{tag}{i}", gpu=0,
                                training_momentum=momentum, category_aware="global") for i, bn in enumerate(bns)]


def _save_edc_statistics(utils, obs, work: Path, momentum: float, train) -> None:
    """The hooks' class statistics of ``train`` (its ``pre_hook_fn`` pass, then ``save``), for later hooks to load.
    Call with ``Tensor.cuda`` the identity on a CPU host (its hooks move their statistics with ``.cuda(gpu)``)."""
    collect = _edc_hooks(utils, obs.bn, work, momentum)
    for h in collect:
        h.set_hook(pre=True)
    with torch.no_grad():
        for start in range(0, len(train.labels), 512):
            for h in collect:
                h.set_label(train.labels[start:start + 512])
            obs.net(train.images[start:start + 512])
    for h in collect:
        h.save()
        h.close()


def compare_edc(root: Path, work: Path, train, args) -> None:
    """EDC's statistics-matching term, one observer and one synthetic batch: the reference's own ``BNFeatureHook``
    (Branch_CIFAR_10/recover/utils.py, as recover.py configures it: ``category_aware 'global'``,
    ``training_momentum`` 0.8) hooked on raydd's observer network beside raydd's ``EDC._chunk_loss`` on the same
    images. The hook computes its class statistics from the real data itself (its ``pre_hook_fn``, ``save``,
    reload). Printed per synthesis iteration: both sides' statistics loss (first BN layer ×10, as both weight
    it), the part that is the global BN-statistics term (the hook re-run with its class statistics set to the
    BN running statistics gives twice its global term), the class term, and the gradients w.r.t. the images."""
    sys.modules.pop("utils", None)
    utils = _import_reference(root / "Branch_CIFAR_10" / "recover", "utils")
    as_code = dict(class_term="code", stat_momentum=args.edc_momentum) if args.edc_as_code else {}
    cfg = make_config("edc", "digits", args.ipc, augment=False, flatness_weight=0.0, ce_weight=0.0, lr_schedule="constant",
                      **as_code)
    method = get_method("edc")(cfg, train, farm_observer(work / "observer", args), device="cpu", seed=args.seed)
    (obs,) = method.observers
    print(f"  observer {obs.model_name}: {len(obs.bn)} BatchNorm layers; raydd alpha {cfg.alpha}, first-layer "
          f"x{cfg.first_bn_multiplier}, class_term {cfg.class_term!r}, stat_momentum {cfg.stat_momentum}; "
          f"reference training_momentum {args.edc_momentum}")

    with contextlib.ExitStack() as stack:
        if not torch.cuda.is_available():  # its hooks load their statistics with .cuda(gpu)
            stack.enter_context(_patched(torch.Tensor, "cuda", lambda self, *a, **k: self))
        _save_edc_statistics(utils, obs, work, args.edc_momentum, train)
        reference = _edc_hooks(utils, obs.bn, work, args.edc_momentum)  # loads what it saved
        as_global = _edc_hooks(utils, obs.bn, work, args.edc_momentum)  # its class statistics replaced below
        for h, bn in zip(as_global, obs.bn):
            h.category_running_dd_mean_list = bn.running_mean.view(1, -1).expand(train.info.num_classes, -1)
            h.category_running_dd_var_list = bn.running_var.view(1, -1).expand(train.info.num_classes, -1)
        rescale = [cfg.first_bn_multiplier] + [1.0] * (len(obs.bn) - 1)
        images = method.images.detach().clone()
        y = method.labels
        print("  iteration | stat loss ref / raydd | global term ref / raydd (rel. diff) | class term ref / raydd "
              "| gradient w.r.t. S: rel. diff (cosine)")
        for it in range(args.iterations):
            for group in (reference, as_global):
                for h in group:
                    h.set_hook(pre=False)
                    h.set_label(y)
            x_ref = images.clone().requires_grad_(True)
            for h in as_global:
                h.close()
            obs.net(x_ref)
            ref_stat = sum(h.r_feature * m for h, m in zip(reference, rescale))
            (g_ref,) = torch.autograd.grad(ref_stat, x_ref)
            for h in reference:
                h.close()
            for h in as_global:
                h.set_hook(pre=False)
            with torch.no_grad():
                obs.net(images)
            ref_global = float(sum(h.r_feature * m for h, m in zip(as_global, rescale))) / 2
            for h in as_global:
                h.close()
            x_mine = images.clone().requires_grad_(True)
            mine_loss, parts = method._chunk_loss(obs, x_mine, x_mine.detach(), y, update_running=True)
            (g_mine,) = torch.autograd.grad(mine_loss / cfg.stat_weight, x_mine)
            mine_global, mine_class = cfg.alpha * parts["loss_global"], (1 - cfg.alpha) * parts["loss_class"]
            cos = float(F.cosine_similarity(g_ref.flatten(), g_mine.flatten(), dim=0))
            print(f"  {it + 1:9d} | {float(ref_stat.detach()):.6g} / {parts['loss_stat']:.6g} | {ref_global:.6g} / "
                  f"{mine_global:.6g} ({abs(ref_global - mine_global) / abs(ref_global):.1e}) | "
                  f"{float(ref_stat.detach()) - ref_global:.6g} / {mine_class:.6g} | {max_rel(g_mine, g_ref):.2e} ({cos:.4f})")
            images = (images - args.edc_step * g_ref.sign()).detach()  # a move of S, the same for both sides


def compare_edc_loop(root: Path, work: Path, args) -> None:
    """EDC's synthesis loop, 5 iterations: recover.py's ``main_worker`` iteration (Adam betas 0.5/0.9 on the
    pixels, its ``lr_cosine_policy``, its pair transform RandomResizedCrop(scale 0.08-1) + flip seeded per
    iteration, CE + r_loss · (its ``BNFeatureHook`` terms, the first ×10), its ``clip``) restated around its own
    functions, since main_worker needs NCCL and CUDA, beside raydd's ``EDC.step`` with the code's knobs
    (``class_term='code'``, ``stat_momentum`` = its training_momentum, crop 0.08-1, no flatness term: recover.sh
    passes no --flatness). CIFAR-10 (3 channels: its ``clip`` clamps three channels with CIFAR-100's mean and
    std, which raydd's clip bounds are set to here), 20 images per class, one BN ConvNet-3 w32 observer, IPC
    ``--ipc``; raydd's augmentation is replaced by the code's transform with the code's seeds (the crop's
    interpolation is the code's own: torchvision's resized crop, raydd's an affine grid)."""
    import random as pyrandom

    import torchvision.transforms as T

    sys.modules.pop("utils", None)
    utils = _import_reference(root / "Branch_CIFAR_10" / "recover", "utils")
    train, _ = load_train_test("cifar10", args.data_root)
    train = train.per_class(20, seed=args.seed)
    farm(FarmSpec(store=str(work / "observer"), dataset="cifar10", data_root=args.data_root, train_per_class=20,
                  backend="local", recipe="observer", trajectories=1, model={"arch": "convnet", "width": 32, "depth": 3},
                  recipe_options={"epochs": 2, "batch_size": 64}), progress=False)
    store = TrajectoryStore(str(work / "observer"))
    cfg = make_config("edc", "cifar10", args.ipc, class_term="code", stat_momentum=args.edc_momentum,
                      crop_scale_min=0.08, flatness_weight=0.0, total_iterations=args.iterations)
    method = get_method("edc")(cfg, train, store, device="cpu", seed=args.seed)
    (obs,) = method.observers
    mean100 = torch.tensor([0.5071, 0.4867, 0.4408], dtype=torch.float64).view(1, 3, 1, 1)  # its clip's constants,
    std100 = torch.tensor([0.2675, 0.2565, 0.2761], dtype=torch.float64).view(1, 3, 1, 1)  # in float64 as its numpy
    method._pixel_low = (-mean100 / std100).float()
    method._pixel_high = ((1 - mean100) / std100).float()
    with torch.no_grad():
        method.images.copy_(torch.maximum(torch.minimum(method.images, method._pixel_high), method._pixel_low))
    start, y = method.images.detach().clone(), method.labels.clone()
    transform = T.Compose([T.RandomResizedCrop(train.info.resolution[0], scale=(0.08, 1)), T.RandomHorizontalFlip()])

    # --- the reference's iterations
    seeds, ref_images, ref_losses, ref_grads = [], [], [], []
    rng = pyrandom.Random(args.seed)  # its ApplyTransformToPair draws from the global random: seeded here
    with contextlib.ExitStack() as stack:
        if not torch.cuda.is_available():
            stack.enter_context(_patched(torch.Tensor, "cuda", lambda self, *a, **k: self))
        _save_edc_statistics(utils, obs, work, args.edc_momentum, train)
        hooks = _edc_hooks(utils, obs.bn, work, args.edc_momentum)  # loads what it saved
        for h in hooks:
            h.set_hook(pre=False)
        inputs = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([inputs], lr=cfg.lr, betas=[0.5, 0.9], eps=1e-8)
        lr_scheduler = utils.lr_cosine_policy(cfg.lr, 0, args.iterations)
        rescale = [cfg.first_bn_multiplier] + [1.0] * (len(hooks) - 1)
        for iteration in range(args.iterations):
            lr_scheduler(optimizer, iteration, iteration)
            seed = rng.randint(0, int(1e13))
            seeds.append(seed)
            torch.manual_seed(seed)
            inputs_jit = transform(inputs)
            for h in hooks:
                h.set_label(y)
            optimizer.zero_grad()
            for h in hooks:
                h.set_ori()
            utils.clip(inputs.data)
            out = obs.net(inputs_jit)
            loss = F.cross_entropy(out, y) + cfg.stat_weight * sum(h.r_feature * m for h, m in zip(hooks, rescale))
            loss.backward()
            ref_grads.append(inputs.grad.detach().clone())
            optimizer.step()
            inputs.data = utils.clip(inputs.data)
            ref_images.append(inputs.detach().clone())
            ref_losses.append(float(loss.detach()))
        for h in hooks:
            h.close()

    # --- raydd's, the code's crops replayed
    replay = list(seeds)

    def code_crop(x, x_ema, generator):
        seed = replay.pop(0)
        torch.manual_seed(seed)
        a = transform(x)
        torch.manual_seed(seed)
        return a, transform(x_ema)

    losses = []
    with _patched(method, "_augment_pair", code_crop):
        for _ in range(args.iterations):
            losses.append(method.step()["loss"])
            images = method.images.detach().clone()
            i = len(losses) - 1
            print(f"  {i + 1:9d} | {max_rel(images, ref_images[i]):.2e} | {max_rel(method.images.grad, ref_grads[i]):.2e} | "
                  f"{abs(losses[i] - ref_losses[i]) / abs(ref_losses[i]):.2e} | {ref_losses[i]:.6g} / {losses[i]:.6g}")


# ----------------------------------------------------------------------------- EDC's evaluation
@dataclasses.dataclass
class _EDCEvalRecord:
    """One student of EDC's direct_train.py: per epoch its parameters, EMA parameters and mean loss; per batch
    the indices, the augmented batch before CutMix, the CutMix draw, MSE and CE; its final EMA test accuracy."""

    params: list[torch.Tensor] = dataclasses.field(default_factory=list)
    ema: list[torch.Tensor] = dataclasses.field(default_factory=list)
    epoch_loss: list[float] = dataclasses.field(default_factory=list)
    orders: list[torch.Tensor] = dataclasses.field(default_factory=list)
    batches: list[torch.Tensor] = dataclasses.field(default_factory=list)
    cutmix: list = dataclasses.field(default_factory=list)
    losses: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    acc: float = float("nan")


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().clone() for t in tensors])


@contextlib.contextmanager
def _recording_losses(into: list):
    """F.mse_loss and F.cross_entropy of training forward passes (their input needs grad), as (mse, ce) pairs."""
    mse, ce = F.mse_loss, F.cross_entropy
    pending: list[float] = []

    def recording_mse(a, b, *x, **k):
        out = mse(a, b, *x, **k)
        if a.requires_grad:
            pending.append(float(out))
        return out

    def recording_ce(a, b, *x, **k):
        out = ce(a, b, *x, **k)
        if a.requires_grad and pending:
            into.append((pending.pop(), float(out)))
        return out

    with _patched(F, "mse_loss", recording_mse), _patched(F, "cross_entropy", recording_ce):
        yield


class _PixelSet(torch.utils.data.Dataset):
    """8-bit images as PIL images through a transform (the code's ImageFolder of PNGs), recording the order."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, transform) -> None:
        from torchvision.transforms.functional import to_pil_image

        self.images = [to_pil_image(p) for p in pixels]
        self.labels, self.transform, self.accessed = labels, transform, []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        self.accessed.append(int(i))
        return self.transform(self.images[i]), int(self.labels[i])


def _edc_code_modules(root: Path):
    """EDC's Branch_CIFAR_10/train/direct_train.py and its train/utils.py, imported unmodified; wandb, timm and
    prefetch_generator (imported at its top, unused by ``train``) are stubs when missing."""
    stubs = {"wandb": _wandb_stub(_Recorder()), "timm": types.ModuleType("timm")}
    prefetch = types.ModuleType("prefetch_generator")
    prefetch.BackgroundGenerator = iter
    stubs["prefetch_generator"] = prefetch
    for name in ("relabel", "baseline"):
        for loaded in [m for m in sys.modules if m.split(".")[0] == name]:
            sys.modules.pop(loaded)
    for name, stub in stubs.items():
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = stub
    direct_train = _import_reference(root / "Branch_CIFAR_10", "direct_train", "train")
    code_utils = sys.modules["utils"]
    return direct_train, code_utils


def run_reference_edc_evaluation(root: Path, pixels, labels, info, teachers, test, spec, args):
    """direct_train.py's ``train`` (per epoch) and ``validate`` on a fixed 8-bit set: run.sh's settings
    (train.sh: AdamW lr 1e-3 on its get_parameters groups, weight decay 0.01, MultiStepLR x0.5 at 0.8/0.9/0.95 of
    the epochs (its 800/900/950 of 1000), EMA 0.99, CutMix α 1, loss mse_gt with CE weight 0.025) and its train
    transform (RandAugment, ToTensor, RandomResizedCrop scale 0.08-1, flip, Normalize: digits' statistics and
    size). Student: raydd's BatchNorm ConvNet from raydd's initialisation of network i (the same both sides);
    teachers: copies of raydd's observers."""
    import copy

    import torchvision.transforms as T
    from raydd.evaluation.standard import fresh_network

    direct_train, code_utils = _edc_code_modules(root)
    transform = T.Compose([T.RandAugment(), T.ToTensor(),
                           T.RandomResizedCrop(size=RESOLUTION, scale=(0.08, 1),
                                               interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                           T.RandomHorizontalFlip(), T.Normalize(info.mean, info.std)])
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(test.images, test.labels),
                                             batch_size=256, shuffle=False)
    records = []
    for i in range(args.eval_networks):
        record = _EDCEvalRecord()
        model, _ = fresh_network(spec, args.seed + i, torch.device("cpu"))
        torch.manual_seed(args.seed + i)
        np.random.seed(args.seed + i)
        data = _PixelSet(pixels, labels, transform)
        loader = torch.utils.data.DataLoader(data, batch_size=args.edc_eval_batch, shuffle=True, num_workers=0)

        class RecordingLoader:
            def __iter__(self):
                for images, target in loader:
                    record.batches.append(images.clone())  # before its in-place CutMix
                    yield images, target

        mix_aug = direct_train.mix_aug

        def recording_mix_aug(images, args_, *a, **k):
            out = mix_aug(images, args_, *a, **k)
            record.cutmix.append((out[1].clone(), float(out[2]), [int(v) for v in out[3]]))
            return out

        optimizer = torch.optim.AdamW(code_utils.get_parameters(model), lr=1e-3, weight_decay=0.01)
        epochs = args.edc_eval_epochs
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [round(f * epochs) for f in (0.8, 0.9, 0.95)],
                                                         0.5)
        code_args = argparse.Namespace(optimizer=optimizer, scheduler=scheduler, train_loader=RecordingLoader(),
                                       val_loader=val_loader, mix_type="cutmix", mode="fkd_save", cutmix=1.0,
                                       loss_type="mse_gt", ce_weight=0.025, temperature=20.0, ema_dr=0.99)
        ema_model = direct_train.EMAMODEL(model)
        code_teachers = [copy.deepcopy(t) for t in teachers]
        with contextlib.ExitStack() as stack:
            if not torch.cuda.is_available():
                stack.enter_context(_patched(torch.Tensor, "cuda", lambda self, *a, **k: self))
            stack.enter_context(_patched(direct_train, "mix_aug", recording_mix_aug))
            stack.enter_context(_recording_losses(record.losses))
            devnull = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(devnull))
            stack.enter_context(contextlib.redirect_stderr(devnull))  # autocast('cuda') warns on a CPU host
            for epoch in range(epochs):
                direct_train.wandb_metrics = {}
                before = len(data.accessed)
                record.epoch_loss.append(float(direct_train.train(model, code_teachers, code_args, epoch,
                                                                  ema_model=ema_model)))
                order = torch.tensor(data.accessed[before:])
                record.orders.extend(order[s:s + args.edc_eval_batch] for s in range(0, len(order), args.edc_eval_batch))
                record.params.append(_flat(model.parameters()))
                record.ema.append(_flat(ema_model.ema_model.parameters()))
                scheduler.step()
            ema_model.ema_swap(model)  # its last epoch: validate the EMA parameters (with the raw BN buffers)
            record.acc = float(direct_train.validate(model, code_args, epochs - 1)) / 100
            ema_model.ema_swap(model)
        records.append(record)
    return records


def run_raydd_edc_evaluation(images, labels, info, teachers, test, spec_dict, records, args, **knobs):
    """raydd.evaluation.edc.evaluate_edc on the same set and teachers, replaying the code's batch orders, its
    augmented batches and its CutMix draws; ``knobs``: EDCEvalConfig fields to change (a variant)."""
    import raydd.evaluation.edc as edc
    from raydd.evaluation import EDCEvalConfig
    from raydd.methods.synthetic import SyntheticSet
    from raydd.training import CutMixDraw

    config = EDCEvalConfig(**{**dict(
        model=spec_dict, num_models=len(records), epochs=args.edc_eval_epochs, batch_size=args.edc_eval_batch,
        lr=1e-3, weight_decay=0.01, schedule="multistep", milestones=(0.8, 0.9, 0.95), gamma=0.5, ema_decay=0.99,
        loss="mse_gt", ce_weight=0.025, teachers=True, cutmix_alpha=1.0, randaugment=True, device="cpu",
        seed=args.seed), **knobs})
    orders = [o for r in records for o in r.orders]
    batches = [b for r in records for b in r.batches]
    draws = [CutMixDraw(perm, box[0], box[2], box[1], box[3], lam)  # its box: rows bbx1:bbx2, columns bby1:bby2
             for r in records for perm, lam, box in r.cutmix]
    mine = [_EDCEvalRecord() for _ in records]
    live: dict[str, object] = {}
    fresh_network, model_ema = edc.fresh_network, edc.ModelEMA

    def recording_fresh_network(spec, seed, device):
        live["net"], generator = fresh_network(spec, seed, device)
        return live["net"], generator

    class RecordingEMA(model_ema):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            live["ema"] = self

    def replay_minibatches(n, batch_size, generator, shuffle=True):
        per_epoch = -(-n // batch_size)
        for _ in range(per_epoch):
            yield orders.pop(0)

    def on_epoch(m, epoch):
        mine[m].params.append(_flat(live["net"].parameters()))
        mine[m].ema.append(_flat(live["ema"].shadow))

    syn = SyntheticSet(images=images, labels=labels, dataset={**info.to_dict(), "zca": False}, method="random")
    losses: list[tuple[float, float]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(edc, "fresh_network", recording_fresh_network))
        stack.enter_context(_patched(edc, "ModelEMA", RecordingEMA))
        stack.enter_context(_patched(edc, "minibatches", replay_minibatches))
        stack.enter_context(_patched(edc, "_augmenter", lambda config, info: lambda x, g: batches.pop(0)))
        stack.enter_context(_patched(edc, "draw_cutmix", lambda *a, **k: draws.pop(0)))
        stack.enter_context(_recording_losses(losses))
        result = edc.evaluate_edc(syn, test, config, teachers=teachers, on_epoch=on_epoch)
    per_net = len(losses) // len(records)
    for m, record in enumerate(mine):
        record.losses = losses[m * per_net:(m + 1) * per_net]
        record.acc = result.accuracies[m]
    return mine, (len(orders), len(batches), len(draws))


def compare_edc_evaluation(root: Path, args) -> None:
    """EDC's evaluation (Branch_CIFAR_10/train/direct_train.py, as its run.sh runs it) against raydd's EDC
    protocol with the code's knobs: per epoch the max. rel. difference of the student's parameters, its EMA
    parameters and the batch losses; the final EMA accuracies side by side."""
    from raydd.evaluation import EDCEvalConfig

    print(f"EDC evaluation protocol: reference {REFERENCES['edc']} Branch_CIFAR_10/train/direct_train.py @ "
          f"{commit_of(root)}")
    train, test = load_train_test("digits", resolution=RESOLUTION)
    subset = train.per_class(args.eval_ipc, seed=args.seed)
    test = test.per_class(args.eval_test_per_class, seed=0)
    info = train.info
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    pixels = ((subset.images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)  # the code reads PNGs
    images = (pixels.float() / 255 - mean) / std
    with tempfile.TemporaryDirectory() as tmp:
        store = farm_observer(Path(tmp) / "observer", args)
        cfg = make_config("edc", "digits", 1)
        teachers = get_method("edc")(cfg, train, store, device="cpu", seed=args.seed).observer_models()
    spec_dict = {"arch": "convnet", "width": 32, "depth": 3, "norm": "batch"}
    spec = EDCEvalConfig(model=spec_dict).model_spec(info)
    records = run_reference_edc_evaluation(root, pixels, subset.labels, info, teachers, test, spec, args)
    print(f"  {len(subset.labels)} images (8-bit), {args.eval_networks} students (BN ConvNet-3 w32) x "
          f"{args.edc_eval_epochs} epochs, batch {args.edc_eval_batch}, {len(teachers)} teacher(s); "
          f"{sum(len(r.batches) for r in records)} batches and CutMix draws replayed")
    readings = {"raydd's EDC protocol, the code's knobs": {}}
    if args.eval_variants:
        readings["  weight decay on every parameter (weight_decay_on='all')"] = dict(weight_decay_on="all")
    for name, knobs in readings.items():
        mine, left = run_raydd_edc_evaluation(images, subset.labels, info, teachers, test, spec_dict, records,
                                              args, **knobs)
        print(f"  {name}: replays left unused (orders, batches, CutMix draws) {left}")
        print("    network | epoch | params | EMA params | batch loss (MSE / CE), worst of the epoch")
        for i, (theirs, ours) in enumerate(zip(records, mine)):
            per_epoch = len(theirs.losses) // len(theirs.params)
            for e in range(len(theirs.params)):
                span = slice(e * per_epoch, (e + 1) * per_epoch)
                mse = max(abs(a[0] - b[0]) / abs(b[0]) for a, b in zip(ours.losses[span], theirs.losses[span]))
                ce = max(abs(a[1] - b[1]) / abs(b[1]) for a, b in zip(ours.losses[span], theirs.losses[span]))
                if e < 3 or e == len(theirs.params) - 1 or args.edc_eval_every_epoch:
                    print(f"    {i + 1:7d} | {e + 1:5d} | {max_rel(ours.params[e], theirs.params[e]):.2e} | "
                          f"{max_rel(ours.ema[e], theirs.ema[e]):.2e} | {mse:.2e} / {ce:.2e}")
        print("    network | final EMA test acc reference (its validate) | raydd (evaluate_edc)")
        for i, (theirs, ours) in enumerate(zip(records, mine)):
            print(f"    {i + 1:7d} | {theirs.acc:.4f} | {ours.acc:.4f}")


def farm_observer(root: Path, args) -> TrajectoryStore:
    """One BatchNorm ConvNet-3 (width 32) observer (raydd's ``observer`` recipe) on digits at 28 px."""
    farm(FarmSpec(store=str(root), dataset="digits", resolution=RESOLUTION, backend="local", recipe="observer",
                  trajectories=1, model={"arch": "convnet", "width": 32, "depth": 3},
                  recipe_options={"epochs": 3, "batch_size": 128}), progress=False)
    return TrajectoryStore(str(root))


# ----------------------------------------------------------------------------- the evaluation protocol
@dataclasses.dataclass
class _EvalRecord:
    """One network of the reference's evaluate_synset: its initial and final parameters, its epochs' batch
    orders, its DiffAugment draws and its final test accuracy."""

    initial: list[torch.Tensor]
    final: list[torch.Tensor] = dataclasses.field(default_factory=list)
    perms: list[torch.Tensor] = dataclasses.field(default_factory=list)
    dsa_calls: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)
    acc: float = float("nan")


def run_reference_evaluation(root: Path, images, labels, test, args) -> list[_EvalRecord]:
    """mtt-distillation's utils.evaluate_synset (the DC/DSA/DM/MTT evaluation: SGD momentum 0.9, weight decay
    5e-4, DSA, lr x0.1 at Epoch//2 + 1, Epoch + 1 passes) on a fixed set, ``--eval-networks`` fresh ConvNets."""
    utils = _import_reference(root, "utils")
    info = test.info
    ns = argparse.Namespace(lr_net=args.eval_lr, epoch_eval_train=args.eval_epochs, batch_train=args.eval_batch,
                            dsa=True, dsa_strategy=args.dsa_strategy, dsa_param=utils.ParamDiffAug(), device="cpu",
                            dataset="digits", dc_aug_param=None)
    testloader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(test.images, test.labels),
                                             batch_size=256, shuffle=False, num_workers=0)
    records = []
    for i in range(args.eval_networks):
        net = utils.get_network("ConvNet", info.channels, info.num_classes, tuple(info.resolution))
        torch.manual_seed(args.seed + i)  # get_network seeds torch from the clock; the batch orders from here
        record, holder = _EvalRecord([p.detach().clone() for p in net.parameters()]), _Recorder()
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(utils, "DiffAugment", _recording_augment(utils.DiffAugment, holder)))
            stack.enter_context(_patched(torch, "randperm", _recording_randperm(holder)))  # the DataLoader's shuffle
            devnull = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(devnull))
            stack.enter_context(contextlib.redirect_stderr(devnull))  # its tqdm bar
            trained, _, acc = utils.evaluate_synset(i, net, images.clone(), labels.clone(), testloader, ns)
        record.perms = holder.perms
        passes = args.eval_epochs + 1
        if len(record.perms) == 2 * passes:  # torch's RandomSampler draws a second permutation per epoch for
            record.perms = record.perms[::2]  # the remainder of len(data) / len(data) samples: empty, unused
        if len(record.perms) != passes:
            raise RuntimeError(f"the reference's DataLoader drew {len(record.perms)} permutations in {passes} passes")
        record.dsa_calls, record.acc = holder.dsa_calls, float(acc)
        record.final = [p.detach().clone() for p in trained.parameters()]
        records.append(record)
    return records


def run_raydd_evaluation(images, labels, test, args, records: list[_EvalRecord], **protocol):
    """raydd's standard protocol (raydd.evaluation.standard.train_and_test) on the same set, each network from
    the reference network's initial parameters, with its batch orders and DiffAugment draws; ``protocol``:
    EvalConfig fields to set (the default: raydd's defaults). Returns per network (final parameters, test acc)."""
    import raydd.evaluation.standard as standard
    import raydd.training as training
    from raydd.evaluation import EvalConfig
    from raydd.models import build_model

    config = EvalConfig(model={"arch": "convnet", "width": 128, "depth": 3}, num_models=len(records),
                        epochs=args.eval_epochs, batch_size=args.eval_batch, lr=args.eval_lr,
                        dsa_strategy=args.dsa_strategy, together=False, device="cpu", seed=args.seed,
                        **{"dsa_align_corners": args.align_corners, **protocol})
    inits = [r.initial for r in records]
    perms = [p for r in records for p in r.perms]
    calls = [c for r in records for c in r.dsa_calls]
    finals: list[list[torch.Tensor]] = []

    def fresh_network(spec, seed, device):
        net = build_model(spec).to(device)
        with torch.no_grad():  # the reference's ConvNet: the same tensors in the same order
            for mine, theirs in zip(net.parameters(), inits.pop(0), strict=True):
                mine.copy_(theirs)
        return net, torch.Generator().manual_seed(seed)

    def minibatches(n, batch_size, generator, shuffle=True):
        order = perms.pop(0)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]

    evaluate_together = standard.evaluate_together

    def recording_evaluate_together(stack, *a, **k):
        finals.extend([p.detach().clone() for p in net.parameters()] for net in stack.write_back())
        return evaluate_together(stack, *a, **k)

    replays: list[_ReplayDSA] = []

    def make_dsa(strategy, *, align_corners, **_):  # the protocol's own grid choice, the reference's draws
        replays.append(_ReplayDSA(calls, args.dsa_strategy, DSAConfig(strategy=strategy, align_corners=align_corners)))
        return replays[-1]

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(standard, "fresh_network", fresh_network))
        stack.enter_context(_patched(training, "minibatches", minibatches))
        stack.enter_context(_patched(standard, "evaluate_together", recording_evaluate_together))
        stack.enter_context(_patched(standard, "make_dsa", make_dsa))
        result = standard.train_and_test(images, labels, test, test.info, config, lr=args.eval_lr)
    left = (len(perms), sum(len(r.calls) for r in replays))
    return list(zip(finals, result.accuracies)), left


def compare_evaluation(root: Path, args) -> None:
    print(f"standard evaluation protocol: reference {REFERENCES['mtt']} utils.evaluate_synset @ {commit_of(root)}")
    train, test = load_train_test("digits", resolution=RESOLUTION)
    subset = train.per_class(args.eval_ipc, seed=args.seed)  # a fixed set: random real images, hard labels
    test = test.per_class(args.eval_test_per_class, seed=0)
    records = run_reference_evaluation(root, subset.images, subset.labels, test, args)
    print(f"  {len(subset.labels)} images, {args.eval_networks} networks x {args.eval_epochs} epochs (reference: "
          f"{args.eval_epochs + 1} passes), batch {args.eval_batch}, lr {args.eval_lr}, DSA; "
          f"{sum(len(r.perms) for r in records)} batch orders, {sum(len(r.dsa_calls) for r in records)} DSA calls")
    readings = {"raydd's standard protocol": {}}
    if args.eval_variants:  # each of the schedule's three knobs back to raydd's earlier choice
        readings.update({"  without the extra pass": dict(extra_pass=False),
                         "  momentum kept at the decay": dict(decay_resets_momentum=False),
                         "  DSA's grid (align_corners False, the protocol's default)": dict(dsa_align_corners=False)})
    for name, protocol in readings.items():
        rows, left = run_raydd_evaluation(subset.images, subset.labels, test, args, records, **protocol)
        print(f"  {name}: draws left unused (batch orders, DSA calls) {left}")
        print("    network | final parameters (max rel. diff, all as one vector) | test acc reference | test acc raydd")
        for i, (record, (final, acc)) in enumerate(zip(records, rows)):
            diff = max_rel(torch.cat([a.flatten() for a in final]), torch.cat([b.flatten() for b in record.final]))
            print(f"    {i + 1:7d} | {diff:.2e} | {record.acc:.4f} | {acc:.4f}")


def farm_store(root: Path, args) -> TrajectoryStore:
    farm(FarmSpec(store=str(root), dataset="digits", resolution=RESOLUTION, backend="local", recipe="expert", trajectories=1,
                  model={"width": 128, "depth": 3}, recipe_options={"epochs": args.expert_epochs + args.max_start_epoch,
                                                                    "batch_size": 256}), progress=False)
    return TrajectoryStore(str(root))


def farm_pad_store(root: Path, args) -> TrajectoryStore:
    """PAD's experts: one plain expert (the difficulty scorer, its epoch 1) and one pad_expert on its EL2N
    curriculum (the recipe's defaults), ConvNet-3 w128 on digits at 28 px."""
    farm_store(root, args)
    farm(FarmSpec(store=str(root), dataset="digits", resolution=RESOLUTION, backend="local", recipe="pad_expert",
                  trajectories=1, model={"width": 128, "depth": 3},
                  recipe_options={"epochs": args.expert_epochs + args.max_start_epoch, "batch_size": 256,
                                  "score_models": 1, "score_epoch": 1}), progress=False)
    return TrajectoryStore(str(root))


def write_buffer(store: TrajectoryStore, kind: str, path: Path) -> None:
    """The store's one trajectory of ``kind`` as the reference's replay buffer file."""
    (info,) = store.list(kind=kind)
    with store.open(info.trajectory_id) as trajectory:
        save_reference_buffer([expert_epochs(trajectory)], path)


def curriculum_check(root: Path) -> str:
    """PAD's buffer_CL.py schedule (its linear_cl_scheduler_acse and branches) against raydd's kept_fractions, over
    100 epochs of its README command's settings: the first epoch where they differ, or 'equal'."""
    from raydd.farm.pad import PADExpertConfig

    scheduler = _import_reference(root, "utils.utils_cl_scheduler").utils_cl_scheduler
    cfg = PADExpertConfig()
    for e in range(100):
        if e <= cfg.add_end_epoch:
            theirs = (0.0, scheduler.linear_cl_scheduler_acse(e, cfg.init_ratio, cfg.add_end_epoch))
        elif e <= cfg.rm_epoch_first:
            theirs = (0.0, 1.0)
        elif e <= cfg.rm_epoch_second:
            theirs = (cfg.rm_easy_ratio_first, 1.0)
        else:
            theirs = (cfg.rm_easy_ratio_second, 1.0)
        if theirs != cfg.kept_fractions(e):
            return f"differ at epoch {e}: {theirs} vs {cfg.kept_fractions(e)}"
    return "equal for epochs 0..99"


def farm_ncfm_pool(root: Path, args) -> TrajectoryStore:
    """NCFM's pool: ``--dance-experts`` pre-trained ConvNet-3 w128 (its pretrain settings: batch 128, DSA
    color_crop) on digits at 28 px."""
    farm(FarmSpec(store=str(root), dataset="digits", resolution=RESOLUTION, backend="local", recipe="pretrain",
                  trajectories=args.dance_experts, model={"width": 128, "depth": 3},
                  recipe_options={"epochs": 2, "batch_size": 128, "dsa_strategy": "color_crop"}), progress=False)
    return TrajectoryStore(str(root))


def farm_pretrained(root: Path, args) -> TrajectoryStore:
    """``--dance-experts`` pre-trained ConvNet-3 w128 experts (raydd's ``pretrain`` recipe) on digits at 28 px."""
    farm(FarmSpec(store=str(root), dataset="digits", resolution=RESOLUTION, backend="local", recipe="pretrain",
                  trajectories=args.dance_experts, model={"width": 128, "depth": 3},
                  recipe_options={"epochs": 2, "batch_size": 256}), progress=False)
    return TrajectoryStore(str(root))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference-root", required=True, type=Path)
    p.add_argument("--methods", nargs="*", default=["mtt"], choices=sorted(REFERENCES))
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--ipc", type=int, default=2)
    p.add_argument("--syn-steps", type=int, default=10)
    p.add_argument("--expert-epochs", type=int, default=2)
    p.add_argument("--max-start-epoch", type=int, default=3)
    p.add_argument("--lr-img", type=float, default=100.0)
    p.add_argument("--lr-lr", type=float, default=1e-5)
    p.add_argument("--syn-lr-init", type=float, default=0.01)
    p.add_argument("--batch-syn", type=int, default=None)
    p.add_argument("--no-dsa", dest="dsa", action="store_false")
    p.add_argument("--dsa-strategy", default="color_crop_cutout_flip_scale_rotate")
    p.add_argument("--align-corners", action=argparse.BooleanOptionalAction, default=True,
                   help="raydd's MTTConfig.dsa_align_corners (default True, its default) and, for --protocols "
                        "standard, EvalConfig.dsa_align_corners (True: MTT's evaluate_synset's grid)")
    p.add_argument("--tesla-as-released", action=argparse.BooleanOptionalAction, default=True,
                   help="TESLA: raydd's lr_img halved, as the released code's image step is half Eq. 6's gradient "
                        "(default); --no-tesla-as-released compares the same lr_img")
    p.add_argument("--lr-y", type=float, default=2.0, help="DATM's label lr (its config default)")
    p.add_argument("--threshold", type=float, default=1.0, help="DATM's skip threshold (its config default)")
    p.add_argument("--current-max-start-epoch", type=int, default=None,
                   help="DATM's growing window (its Sequential_Generation); default: off")
    p.add_argument("--expansion-end-epoch", type=int, default=1000)
    p.add_argument("--ncfm-freqs", type=int, default=64, help="NCFM's number of frequency arguments t")
    p.add_argument("--ncfm-lr", type=float, default=1e-3, help="NCFM's AdamW lr on the pixels (its 0.01 x 0.1)")
    p.add_argument("--pad-replay-selection", action="store_true",
                   help="PAD: raydd's loss keeps the parameters the reference's kept (its sort replayed): "
                        "separates the selection's near-ties at the cut from the rest of the iteration")
    p.add_argument("--pad-loss-ratio", type=float, default=0.5,
                   help="PAD's loss_ratio (α; its CIFAR-10 IPC 10 config's 0.5): the fraction of parameters dropped")
    p.add_argument("--lr-img-dm", type=float, default=1.0, help="DM's lr_img (main_DM.py's default)")
    p.add_argument("--batch-real", type=int, default=64, help="DM's real images per class")
    p.add_argument("--lr-img-dance", type=float, default=None, help="DANCE's lr_img (default: its 0.01·IPC)")
    p.add_argument("--dance-factor", type=int, default=2, help="DANCE's factor l (its default for small images)")
    p.add_argument("--dance-experts", type=int, default=2, help="DANCE's pre-trained experts (its num_premodel)")
    p.add_argument("--dance-paper-steps", action="store_true",
                   help="raydd's DANCE with its default one step per loss (the paper's) instead of the code's "
                        "per-class steps: shows the size of that departure")
    p.add_argument("--edc-momentum", type=float, default=0.8,
                   help="EDC's training_momentum (recover.sh's 0.8): its running average of the batch statistics")
    p.add_argument("--edc-as-code", action="store_true",
                   help="raydd's EDC with class_term='code' and stat_momentum=--edc-momentum (the released code's "
                        "form) instead of eq. 5's")
    p.add_argument("--edc-loop", action="store_true",
                   help="EDC: also compare the synthesis loop (recover.py's iteration) on CIFAR-10, needs --data-root")
    p.add_argument("--data-root", default=None, help="where cifar10 is (--edc-loop), e.g. ../shared/datasets")
    p.add_argument("--edc-step", type=float, default=0.05, help="how far S moves between the EDC iterations compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smooth-relu", action="store_true",
                   help="diagnostic: every nn.ReLU (both sides, the farm too) computes softplus(x, beta=10): a "
                        "smooth activation, so a pre-activation that rounding puts on the other side of 0 cannot "
                        "flip its derivative in the unrolled student's gradient")
    p.add_argument("--protocols", nargs="*", default=[], choices=["standard", "edc"],
                   help="also compare an evaluation protocol: 'standard' against mtt-distillation's evaluate_synset, "
                        "'edc' against EDC's Branch_CIFAR_10/train/direct_train.py (run.sh's evaluation)")
    p.add_argument("--edc-eval-epochs", type=int, default=20, help="EDC protocol: epochs per student")
    p.add_argument("--edc-eval-batch", type=int, default=10, help="EDC protocol: batch (its train.sh's 10)")
    p.add_argument("--edc-eval-every-epoch", action="store_true", help="EDC protocol: print every epoch's row")
    p.add_argument("--eval-ipc", type=int, default=10, help="images per class of the fixed set evaluated")
    p.add_argument("--eval-test-per-class", type=int, default=50, help="test images per class")
    p.add_argument("--eval-networks", type=int, default=2)
    p.add_argument("--eval-epochs", type=int, default=20)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--eval-lr", type=float, default=0.01)
    p.add_argument("--eval-variants", action="store_true",
                   help="also run raydd's protocol without the extra pass, and keeping momentum at the decay")
    args = p.parse_args(argv)
    if args.lr_img_dance is None:
        args.lr_img_dance = 0.01 * args.ipc
    needed = list(args.methods) + (["edc"] if "edc" in args.protocols else []) + \
        (["mtt"] if "standard" in args.protocols else [])
    missing = sorted({REFERENCES[m] for m in needed if not (args.reference_root / REFERENCES[m]).is_dir()})
    if missing:
        p.error(f"--reference-root {args.reference_root} holds no {', '.join(missing)}: clone the reference "
                f"repositories there")
    if "dm" in args.methods and args.ipc not in (1, 10, 20, 30, 40, 50):
        p.error(f"--ipc {args.ipc}: main_DM.py runs IPC 1, 10, 20, 30, 40 or 50 only (its get_loops)")
    torch.set_num_threads(1)
    if args.smooth_relu:
        torch.nn.ReLU.forward = lambda self, x: F.softplus(x, beta=10.0)
    if "standard" in args.protocols:
        compare_evaluation(args.reference_root / REFERENCES["mtt"], args)
    if "edc" in args.protocols:
        compare_edc_evaluation(args.reference_root / REFERENCES["edc"], args)
    if args.protocols and not args.methods:
        return 0
    train, _ = load_train_test("digits", resolution=RESOLUTION)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = farm_store(tmp / "store", args) if {"mtt", "tesla", "datm"} & set(args.methods) else None
        pretrained = farm_pretrained(tmp / "pretrained", args) if "dance" in args.methods else None
        if store is not None:
            write_buffer(store, "expert", tmp / "buffers" / "digits" / "ConvNet" / "replay_buffer_0.pt")
        pad_store = farm_pad_store(tmp / "pad_store", args) if "pad" in args.methods else None
        if pad_store is not None:
            write_buffer(pad_store, "pad_expert", tmp / "pad_buffers" / "digits" / "ConvNet" / "replay_buffer_0.pt")
        for name in args.methods:
            root = args.reference_root / REFERENCES[name]
            print(f"{name}: reference {REFERENCES[name]} @ {commit_of(root)}")
            if name == "edc":
                compare_edc(root, tmp / "edc", train, args)
                if args.edc_loop:
                    print(f"  EDC's synthesis loop (cifar10 IPC {args.ipc}, the code's knobs; training_momentum "
                          f"{args.edc_momentum})")
                    print("  iteration | images | gradient w.r.t. S | loss (max rel. diff, float32) | loss ref / raydd")
                    compare_edc_loop(root, tmp / "edc_loop", args)
                continue
            if name == "ncfm":
                rows = run_raydd_ncfm(farm_ncfm_pool(tmp / "ncfm_pool", args), train, args)
                print("  iteration | images | - | - | loss (matching or calibration, the larger)")
                for i in range(args.iterations):
                    print(f"  {i + 1:9d} | {rows['images'][i]:.2e} | - | - | {rows['loss'][i]:.2e}")
                continue
            record = _Recorder()
            cwd = os.getcwd()
            os.chdir(tmp)  # the references write ./logged_files, ./result
            try:
                if name == "mtt":
                    run_reference_mtt(root, tmp / "buffers", train, args, record)
                elif name == "tesla":
                    run_reference_mtt(root, tmp / "buffers", train, args, record, random_trajectory=False,
                                      teacher_label=False)
                elif name == "datm":
                    run_reference_datm(root, tmp / "buffers", train, args, record)
                elif name == "pad":
                    print(f"  curriculum (buffer_CL.py's schedule vs raydd's): {curriculum_check(root)}")
                    run_reference_datm(root, tmp / "pad_buffers", train, args, record, module="PAD",
                                       loss_ratio=args.pad_loss_ratio, depth_ratio=0.0, loss_threshold_low=0.0)
                elif name == "dance":
                    method = raydd_dance(pretrained, train, args)
                    dance_record = run_reference_dance(root, tmp, method.experts, method.model_spec, train, args,
                                                       record)
                else:
                    run_reference_dm(root, tmp, train, args, record)
            finally:
                os.chdir(cwd)
            if name == "dance":
                rows = run_raydd_dance(method, train, args, record, dance_record)
                print(f"  experts {dance_record.experts}, λ {[round(v, 4) for v in dance_record.lams]}, "
                      f"{len(dance_record.aug_calls)} DiffAug calls replayed, {len(record.images)} reference steps; "
                      f"raydd steps {'once per loss (the paper)' if args.dance_paper_steps else 'per class (the code)'}")
                print("  iteration | images | - | - | loss (matching or calibration, the larger)")
                for i in range(args.iterations):
                    print(f"  {i + 1:9d} | {rows['images'][i]:.2e} | - | - | {rows['loss'][i]:.2e}")
                continue
            rows = run_raydd_dm(train, args, record) if name == "dm" else \
                run_raydd_matching(name, pad_store if name == "pad" else store, train, args, record)
            drift = f"; reference α {args.syn_lr_init:g} -> {float(record.syn_lr[-1]):.9g}" if record.syn_lr else ""
            print(f"  start epochs {record.starts or '-'}, {len(record.nets)} embedders, {len(record.dsa_calls)} DSA "
                  f"calls and {len(record.perms)} permutations replayed{drift}; reference loss {record.losses[0]:.6g} "
                  f"-> {record.losses[-1]:.6g}")
            if "label_init" in rows:
                print(f"  initial label logits (raydd's rule on the reference's images): {rows['label_init'][0]:.2e}")
            if "kept_differ" in rows:
                print(f"  parameters kept by one side's loss and not the other's, per iteration (of "
                      f"{record.sorted[0].numel()}, {args.pad_loss_ratio:g} dropped): {rows['kept_differ']}")
            if "skipped" in rows and name in ("datm", "pad"):
                print(f"  iterations skipped by the reference: {[i + 1 for i, s in enumerate(record.skipped) if s]}; "
                      f"raydd skipped the same ones: {all(rows['skipped'])}")
            print("  iteration | images | syn_lr | labels | loss   (max relative difference, float32)")
            for i in range(args.iterations):
                print(f"  {i + 1:9d} | {rows['images'][i]:.2e} | {rows['syn_lr'][i]:.2e} | {rows['labels'][i]:.2e} "
                      f"| {rows['loss'][i]:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
