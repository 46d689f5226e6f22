"""engine="graph": the pre-drawn, device-resident training step (raydd.graphs) gives the eager loop's numbers.

On the CPU the graph engine runs its steps eagerly (the fallback): it must equal ``train_epoch_together`` bit for
bit — same draws, same arithmetic. Where CUDA is available, the captured graphs are compared with that fallback.
"""
from __future__ import annotations

import pytest
import torch

from raydd.data.augment import make_dsa
from raydd.graphs import GraphTrainer, plan_epoch
from raydd.models import ModelSpec, build_model
from raydd.training import NetworkStack, train_epoch_together

pytestmark = pytest.mark.usefixtures("single_thread")


def _nets(k: int, norm: str = "instance", device: str = "cpu", channels: int = 3):
    spec = ModelSpec(arch="convnet", width=8, depth=2, norm=norm, channels=channels, resolution=(8, 8),
                     num_classes=10)
    nets = []
    for seed in range(k):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nets.append(build_model(spec).to(device))
    return nets


def _train(engine: str, k: int, data, *, epochs: int = 2, cutmix_prob: float = 0.0, momentum: float = 0.0,
           norm: str = "instance", soft: bool = False, strategy: str = "color_crop_cutout_flip_scale_rotate",
           device: str = "cpu", graphs: bool | None = None):
    images, labels = data
    if soft:
        labels = torch.softmax(torch.randn(len(labels), 10, generator=torch.Generator().manual_seed(5)), 1)
    stack = NetworkStack(_nets(k, norm, device, channels=images.shape[1]))
    opt = torch.optim.SGD(stack.parameters(), lr=0.05, momentum=momentum, weight_decay=5e-4 if momentum else 0)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(k)]
    dsa = make_dsa(strategy, flip_ok=False)
    stats = []
    trainer = None
    if engine == "graph":
        trainer = GraphTrainer(stack, opt, images, labels, batch_size=48, generators=gens, device=torch.device(device),
                               dsa=dsa, cutmix_prob=cutmix_prob, graphs=graphs)
    for epoch in range(epochs):
        if epoch == epochs - 1:
            for group in opt.param_groups:  # a learning-rate change mid-run (the protocol's decay)
                group["lr"] *= 0.1
        if trainer is not None:
            stats.append(trainer.epoch())
        else:
            stats.append(train_epoch_together(stack, opt, images, labels, batch_size=48, generators=gens,
                                              device=torch.device(device), augment=lambda x, g: dsa(x, generator=g),
                                              cutmix_prob=cutmix_prob))
    stack.write_back()
    params = [torch.cat([p.detach().flatten().cpu() for p in net.parameters()]) for net in stack.networks]
    buffers = [torch.cat([b.detach().flatten().cpu().double() for b in net.buffers()] or [torch.zeros(0)])
               for net in stack.networks]
    return params, buffers, [[(s.loss, s.acc) for s in epoch] for epoch in stats], [g.get_state() for g in gens], trainer


@pytest.fixture(scope="module")
def data(digits):
    """Three-channel images (digits repeated): see test_single_channel_images_agree_to_rounding for one channel.
    200 images = 4 batches of 48 and a shorter one of 8."""
    train, _ = digits
    return train.images[:200].repeat(1, 3, 1, 1), train.labels[:200]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("case", [
    {},  # the expert recipe: DSA one op per batch, plain SGD
    {"cutmix_prob": 0.5, "momentum": 0.9},  # the pretrain recipe: CutMix, momentum, weight decay
    {"norm": "batch", "momentum": 0.9},  # BatchNorm running statistics (observers, EDC's students)
    {"soft": True, "momentum": 0.9},  # soft labels (the evaluation of DATM's sets)
    {"strategy": "none", "momentum": 0.9},  # no augmentation at all
])
def test_graph_engine_fallback_equals_the_eager_loop_bit_for_bit(data, k, case):
    eager = _train("eager", k, data, **case)
    graph = _train("graph", k, data, **case)
    for a, b in zip(eager[0], graph[0]):
        assert torch.equal(a, b)
    for a, b in zip(eager[1], graph[1]):
        assert torch.equal(a, b)
    assert eager[2] == graph[2]  # per-epoch loss and accuracy of every network
    for a, b in zip(eager[3], graph[3]):  # the generators end where the eager loop leaves them
        assert torch.equal(a, b)


@pytest.mark.parametrize("k", [1, 3])
def test_single_channel_images_agree_to_rounding(digits, k):
    """One network on one-channel images: the eager loop's crop op hands the network a batch whose strides
    PyTorch reads as channels-last (a 1-channel tensor of strides (HW, 1, W, 1)), so those steps' convolutions
    round differently from the graph engine's fixed layout; several networks are stacked (a standard layout) and
    stay bit-identical."""
    train, _ = digits
    data = (train.images[:200], train.labels[:200])
    eager, graph = _train("eager", k, data, momentum=0.9), _train("graph", k, data, momentum=0.9)
    for a, b in zip(eager[0], graph[0]):
        if k == 1:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a, b)


def test_the_plan_draws_what_the_eager_loop_draws(data):
    images, _ = data
    dsa = make_dsa("color_crop_cutout_flip_scale_rotate", flip_ok=True)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    steps = plan_epoch(len(images), 48, gens, dsa=dsa, image_size=(8, 8), cutmix_prob=0.5)
    assert [s.size for s in steps] == [48, 48, 48, 48, 8]
    assert steps[0].inputs["idx"].shape == (2, 48) and steps[0].inputs["dsa_op"].shape == (96,)
    # each network's images share their call's op (one op per call), and the two networks drew their own orders
    ops = steps[0].inputs["dsa_op"].view(2, 48)
    assert (ops == ops[:, :1]).all()
    assert not torch.equal(steps[0].inputs["idx"][0], steps[0].inputs["idx"][1])
    lam_a, lam_b = steps[0].inputs["lam_a"], steps[0].inputs["lam_b"]
    assert torch.equal(lam_b, 1 - lam_a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("k", [1, 3])
def test_cuda_graph_replay_equals_its_eager_fallback(data, k):
    """Replayed graphs run the eager step's kernels; what may differ is what differs between two eager runs on
    the GPU (cuDNN's backward kernels for grouped convolutions are not deterministic): the tolerance is ten
    times that run-to-run difference, at least 1e-5."""
    images, labels = data
    data_cuda = (images.cuda(), labels.cuda())
    fallback = _train("graph", k, data_cuda, epochs=5, momentum=0.9, device="cuda", graphs=False)
    again = _train("graph", k, data_cuda, epochs=5, momentum=0.9, device="cuda", graphs=False)
    graphed = _train("graph", k, data_cuda, epochs=5, momentum=0.9, device="cuda", graphs=True)
    assert graphed[4].replay.replays > 0  # graphs were captured and replayed
    floor = max(float((a - b).abs().max()) for a, b in zip(fallback[0], again[0]))
    worst = max(float((a - b).abs().max()) for a, b in zip(fallback[0], graphed[0]))
    print(f"k={k}: eager run-to-run {floor:.3g}, graph vs eager {worst:.3g}")
    assert worst <= max(1e-5, 10 * floor)
    for (la, aa), (lb, ab) in zip(fallback[2][-1], graphed[2][-1]):
        assert abs(la - lb) < 1e-3 and abs(aa - ab) < 0.02


@pytest.fixture(scope="module")
def rgb_digits_experts(digits, tmp_path_factory):
    """Digits as three-channel images and two experts farmed on them (see the module doc: one channel rounds
    differently in the eager loop's crop steps)."""
    import dataclasses

    from raydd.data.datasets import ImageDataset
    from raydd.farm import FarmData, FarmSpec, farm
    from raydd.store import TrajectoryStore

    train, test = digits

    def rgb(split: ImageDataset) -> ImageDataset:
        info = dataclasses.replace(split.info, channels=3, mean=split.info.mean * 3, std=split.info.std * 3)
        return ImageDataset(split.images.repeat(1, 3, 1, 1), split.labels, info, split.split)

    train3, test3 = rgb(train), rgb(test)
    root = tmp_path_factory.mktemp("rgb") / "store"
    farm(FarmSpec(store=str(root), dataset="digits", backend="local", trajectories=2,
                  recipe_options={"epochs": 4, "batch_size": 64}, model={"width": 16, "depth": 2}),
         progress=False, data=FarmData.from_datasets(train3, test3))
    return train3, TrajectoryStore(root)


@pytest.mark.parametrize("knobs", [{}, {"batch_syn": 7}, {"dsa": False}])
def test_mtt_graph_engine_fallback_equals_the_eager_iteration(rgb_digits_experts, knobs):
    from raydd.methods import MTT, make_config

    train3, store = rgb_digits_experts
    runs = {}
    for engine in ("eager", "graph"):
        config = make_config("mtt", "digits", 2, syn_steps=5, expert_epochs=2, max_start_epoch=2, lr_img=100.0,
                             lr_lr=1e-5, engine=engine, **knobs)
        method = MTT(config, train3, store, device="cpu", seed=3)
        metrics = [method.step() for _ in range(3)]
        runs[engine] = (method.images.detach().clone(), float(method.syn_lr.detach()),
                        [{k: m[k] for k in ("loss", "syn_lr", "grad_norm_img", "grad_norm_lr", "param_dist",
                                            "start_epoch")} for m in metrics],
                        method.generator.get_state(), method.state_dict()["opt_img"])
    eager, graph = runs["eager"], runs["graph"]
    assert torch.equal(eager[0], graph[0]) and eager[1] == graph[1]
    assert eager[2] == graph[2]
    assert torch.equal(eager[3], graph[3])
    assert torch.equal(eager[4]["state"][0]["momentum_buffer"], graph[4]["state"][0]["momentum_buffer"])


def test_mtt_graph_engine_is_refused_where_it_is_not_built():
    from raydd.methods import make_config

    with pytest.raises(ValueError, match="DATMConfig.engine='graph' is invalid: accepted eager"):
        make_config("datm", "cifar10", 1, engine="graph")
    with pytest.raises(ValueError, match="replays the full unroll"):
        make_config("mtt", "cifar10", 1, engine="graph", unroll="checkpoint")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_mtt_cuda_graph_replay_equals_its_eager_fallback(rgb_digits_experts):
    from raydd.methods import MTT, make_config

    train3, store = rgb_digits_experts
    runs = {}
    for graphs in (False, True):
        config = make_config("mtt", "digits", 2, syn_steps=5, expert_epochs=2, max_start_epoch=2, lr_img=100.0,
                             lr_lr=1e-5, engine="graph")
        method = MTT(config, train3, store, device="cuda", seed=3)
        from raydd.graphs import GraphedIteration

        method._graphed = GraphedIteration(method._graph_iteration, device=method.device, metrics=4,
                                           leaves=lambda: [method.images, method.syn_lr],
                                           optimisers=[method.opt_img, method.opt_lr], graphs=graphs)
        losses = [method.step()["loss"] for _ in range(8)]  # 3 warm-up iterations, a capture, 4 replays
        runs[graphs] = (method.images.detach().cpu(), losses, method._graphed.replay.replays)
    assert runs[True][2] == 5 and runs[False][2] == 0
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-4)


@pytest.mark.parametrize("knobs", [{}, {"norm": "batch"}, {"dsa": False}])
def test_dm_graph_engine_fallback_equals_the_eager_iteration(digits, knobs):
    from raydd.methods import DM, make_config

    train, _ = digits
    runs = {}
    for engine, together in (("eager", True), ("graph", None)):
        config = make_config("dm", "digits", 3, width=16, batch_real=32, engine=engine,
                             embed_classes_together=together if knobs.get("norm") != "batch" else None, **knobs)
        method = DM(config, train, None, device="cpu", seed=4)
        metrics = [{k: m[k] for k in ("loss", "grad_norm_img")} for m in (method.step() for _ in range(3))]
        runs[engine] = (method.images.detach().clone(), metrics, method.generator.get_state())
    assert torch.equal(runs["eager"][0], runs["graph"][0])
    assert runs["eager"][1] == runs["graph"][1]
    assert torch.equal(runs["eager"][2], runs["graph"][2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_dm_cuda_graph_replay_equals_its_eager_fallback(digits):
    from raydd.graphs import GraphedIteration
    from raydd.methods import DM, make_config

    train, _ = digits
    runs = {}
    for graphs in (False, True):
        method = DM(make_config("dm", "digits", 3, width=16, batch_real=32, engine="graph"), train, None,
                    device="cuda", seed=4)
        method.step()  # builds the graphed iteration
        method._graphed = GraphedIteration(method._graph_iteration, device=method.device, metrics=2,
                                           leaves=lambda m=method: [m.images], optimisers=[method.opt_img],
                                           graphs=graphs)
        losses = [method.step()["loss"] for _ in range(8)]
        runs[graphs] = (method.images.detach().cpu(), losses, method._graphed.replay.replays)
    assert runs[True][2] == 5
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-5)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-4)
