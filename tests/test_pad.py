"""PAD: the difficulty curriculum of its experts (farm recipe pad_expert) and its parameter-selected matching
loss, on digits through the command line."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from raydd.cli import main
from raydd.farm.pad import PADExpertConfig, curriculum_indices, easy_to_hard, el2n_scores, ranking_digest
from raydd.methods import load_synthetic, make_config
from raydd.models import ModelSpec, build_model, load_flat_params
from raydd.methods.matching import normalised_distance
from raydd.methods.pad import kept_parameters, selected_distance
from raydd.store import TrajectoryStore

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = ["--width", "16", "--depth", "2", "--backend", "local", "--quiet", "--set", "batch_size=64"]
CURRICULUM = ["--set", "score_models=2", "--set", "score_epoch=2", "--set", "add_end_epoch=2", "--set",
              "rm_epoch_first=3", "--set", "rm_epoch_second=4"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_defaults_follow_the_reference_configs_and_readme():
    c1, c10, c50 = (make_config("pad", "cifar10", ipc) for ipc in (1, 10, 50))
    assert (c1.loss_ratio, c10.loss_ratio, c50.loss_ratio) == (0.0, 0.5, 0.25)
    assert (c1.syn_steps, c1.lr_img, c1.lr_y, c1.lr_lr, c1.threshold, c1.max_start_epoch) == (80, 100.0, 5.0, 1e-7,
                                                                                             1.1, 4)
    assert (c50.expert_epochs, c50.lr_img, c50.current_max_start_epoch, c50.max_start_epoch) == (3, 1000.0, 20, 40)
    assert all(c.zca and c.param_selection == "loss" and c.expert_kind == "pad_expert" for c in (c1, c10, c50))
    farm = PADExpertConfig()
    assert (farm.epochs, farm.init_ratio, farm.add_end_epoch, farm.rm_epoch_first, farm.rm_epoch_second,
            farm.rm_easy_ratio_first, farm.rm_easy_ratio_second) == (100, 0.75, 20, 40, 60, 0.1, 0.2)


def test_the_curriculum_is_buffer_cl_schedule():
    cfg = PADExpertConfig(init_ratio=0.5, add_end_epoch=4, rm_epoch_first=6, rm_epoch_second=8,
                          rm_easy_ratio_first=0.25, rm_easy_ratio_second=0.5)
    # e <= 4: the easiest min(1, 0.5 + 0.5 e / 4); e <= 6: all; e <= 8: drop the easiest 25 %; later 50 %
    assert [cfg.kept_fractions(e) for e in range(10)] == [
        (0, 0.5), (0, 0.625), (0, 0.75), (0, 0.875), (0, 1), (0, 1), (0, 1), (0.25, 1), (0.25, 1), (0.5, 1)]
    ranking = [torch.tensor([7, 3, 5, 1]), torch.tensor([0, 2, 4, 6, 8, 9, 10, 11])]  # easiest first
    assert curriculum_indices(cfg, ranking, 1).tolist() == [7, 3, 0, 2, 4, 6]  # raydd epoch 1 is e = 0
    assert curriculum_indices(cfg, ranking, 10).tolist() == [5, 1, 8, 9, 10, 11]


def test_el2n_and_the_easy_to_hard_ranking():
    net = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 0.0], [3.0, 0.0]])
    y = torch.tensor([0, 0, 2, 2])
    scores = el2n_scores([net, net], x, y, 3, device=torch.device("cpu"))
    p = torch.softmax(net(x).double(), 1)
    expected = (p - torch.nn.functional.one_hot(y, 3).double()).norm(dim=1).float()
    assert torch.allclose(scores, expected)
    ranking = easy_to_hard(scores, y, 3)
    assert ranking[0].tolist() == [0, 1] and ranking[1].tolist() == [] and ranking[2].tolist() == [2, 3]


def test_selected_distance_drops_the_smallest_errors_or_the_shallowest():
    start, target = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    end = torch.tensor([0.9, 0.1, 0.5, 0.95, 0.2, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.equal(selected_distance(end, start, target, 0.0, "loss"), normalised_distance(end, start, target))
    keep = kept_parameters(end, target, 0.5, "loss")  # errors (end - 1)^2: the three smallest are 3, 0, 5
    assert sorted(keep.tolist()) == [1, 2, 4]
    loss = selected_distance(end, start, target, 0.5, "loss")
    assert torch.isclose(loss, ((end[[1, 2, 4]] - 1) ** 2).sum() / 3)
    loss.backward()
    assert end.grad[[0, 3, 5]].abs().sum() == 0 and (end.grad[[1, 2, 4]] != 0).all()
    assert kept_parameters(end, target, 0.5, "depth").tolist() == [3, 4, 5]


def test_farm_scores_then_trains_on_the_curriculum_and_pad_condenses(tmp_path, capsys, digits):
    store = str(tmp_path / "store")
    code, _, err = run(capsys, "farm", "--store", store, "--recipe", "pad_expert", "--epochs", "5", *SMALL,
                       *CURRICULUM)
    assert code == 2 and "PAD's difficulty scores need 2 plain experts" in err and \
        "raydd farm --recipe expert --trajectories 2 --epochs 2" in err, err
    code, _, err = run(capsys, "farm", "--store", store, "--recipe", "expert", "--epochs", "3", "--trajectories",
                       "2", *SMALL)
    assert code == 0, err
    code, _, err = run(capsys, "farm", "--store", store, "--recipe", "pad_expert", "--epochs", "5", "--trajectories",
                       "1", *SMALL, *CURRICULUM)
    assert code == 0, err
    ts = TrajectoryStore(store)
    (pad,) = ts.list(kind="pad_expert")
    plain = sorted((int(i.meta["seed"]), i.trajectory_id) for i in ts.list(kind="expert"))
    assert pad.meta["recipe_config"]["scorers"] == [tid for _, tid in plain]
    train, _ = digits
    sizes = torch.bincount(train.labels, minlength=10)
    with ts.open(pad.trajectory_id) as traj:
        counts = [int(row["train_images"]) for row in traj.metrics()[1:]]

    def kept(low, high):
        return sum(int(high * n) - int(low * n) for n in sizes.tolist())

    # epochs 1..5 are e = 0..4: the easiest 75 %, 87.5 %, all, all, all but the easiest 10 %
    assert counts == [kept(0, 0.75), kept(0, 0.875), kept(0, 1), kept(0, 1), kept(0.1, 1)]
    recorded = pad.meta["difficulty"]  # the ranking it trained on, recomputed here from the stored scorers
    networks = []
    for _, tid in plain:
        with ts.open(tid) as scorer:
            net = build_model(ModelSpec.from_dict(scorer.meta["model"]))
            networks.append(load_flat_params(net, scorer.params(2, dtype=torch.float32).clone(), None))
    ranking = easy_to_hard(el2n_scores(networks, train.images, train.labels, 10, device=torch.device("cpu")),
                           train.labels, 10)
    assert recorded["score"] == "el2n" and recorded["score_epoch"] == 2
    assert recorded["ranking_sha256"] == ranking_digest(ranking)

    common = ["condense", "--method", "pad", "--dataset", "digits", "--ipc", "1", "--store", store, "--iterations",
              "2", "--set", "syn_steps=4", "--set", "max_start_epoch=2", "--set", "current_max_start_epoch=null",
              "--set", "init_correct=false", "--set", "loss_ratio=0.5", "--quiet"]
    code, _, err = run(capsys, *common, "--set", "score_models=2", "--set", "score_epoch=2", "--out",
                       str(tmp_path / "x.safetensors"))
    assert code == 2 and "kind=pad_expert" in err, err  # another curriculum (add_end_epoch 20): not these experts
    code, _, err = run(capsys, *common, *CURRICULUM, "--out", str(tmp_path / "pad.safetensors"))
    assert code == 0, err
    syn = load_synthetic(tmp_path / "pad.safetensors")
    assert syn.method == "pad" and syn.config["loss_ratio"] == 0.5 and syn.soft and len(syn) == 10


def test_bad_pad_knobs_are_one_line(capsys):
    code, _, err = run(capsys, "condense", "--method", "pad", "--dataset", "digits", "--ipc", "1", "--set",
                       "param_selection=layers")
    assert code == 2 and "param_selection='layers' is invalid: accepted loss, depth" in err
    code, _, err = run(capsys, "condense", "--method", "pad", "--dataset", "digits", "--ipc", "1", "--set",
                       "rm_epoch_first=10", "--set", "add_end_epoch=30")
    assert code == 2 and "expected add_end_epoch <= rm_epoch_first <= rm_epoch_second" in err
