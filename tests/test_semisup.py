import pytest
import torch

from raydd.data.semisup import SemiSupervisedSplit, semi_supervised_split


def _labels():
    # unbalanced classes: 0 -> 100, 1 -> 35, 2 -> 5, 7 -> 1, shuffled
    labels = torch.tensor([0] * 100 + [1] * 35 + [2] * 5 + [7] * 1)
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]


def test_disjoint_cover_sorted_int64():
    labels = _labels()
    split = semi_supervised_split(labels, fraction=0.2, seed=3)
    assert isinstance(split, SemiSupervisedSplit)
    assert split.labelled.dtype == torch.int64 and split.unlabelled.dtype == torch.int64
    assert torch.equal(split.labelled, split.labelled.sort().values)
    assert torch.equal(split.unlabelled, split.unlabelled.sort().values)
    both = torch.cat([split.labelled, split.unlabelled])
    assert torch.equal(both.sort().values, torch.arange(labels.numel()))
    assert split.num_labelled + split.num_unlabelled == labels.numel()
    assert split.labelled_mask().sum() == split.num_labelled
    assert split.fraction == 0.2 and split.seed == 3


def test_class_balance_and_min_per_class():
    labels = _labels()
    split = semi_supervised_split(labels, fraction=0.1, seed=0)
    counts = {c: int((labels[split.labelled] == c).sum()) for c in (0, 1, 2, 7)}
    # round-half-up(0.1 * n_c), at least 1
    assert counts == {0: 10, 1: 4, 2: 1, 7: 1}
    split = semi_supervised_split(labels, fraction=0.1, seed=0, min_per_class=3)
    counts = {c: int((labels[split.labelled] == c).sum()) for c in (0, 1, 2, 7)}
    assert counts == {0: 10, 1: 4, 2: 3, 7: 1}  # capped at the class size
    split = semi_supervised_split(labels, fraction=0.01, seed=0, min_per_class=0)
    counts = {c: int((labels[split.labelled] == c).sum()) for c in (0, 1, 2, 7)}
    assert counts == {0: 1, 1: 0, 2: 0, 7: 0}


def test_fraction_one_labels_everything():
    labels = _labels()
    split = semi_supervised_split(labels, fraction=1.0)
    assert torch.equal(split.labelled, torch.arange(labels.numel()))
    assert split.unlabelled.numel() == 0 and split.unlabelled.dtype == torch.int64


def test_deterministic_and_seed_dependent():
    labels = _labels()
    a = semi_supervised_split(labels, fraction=0.3, seed=5)
    b = semi_supervised_split(labels, fraction=0.3, seed=5)
    c = semi_supervised_split(labels, fraction=0.3, seed=6)
    assert torch.equal(a.labelled, b.labelled) and torch.equal(a.unlabelled, b.unlabelled)
    assert not torch.equal(a.labelled, c.labelled)


def test_global_rng_untouched_and_independent_of_it():
    labels = _labels()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = semi_supervised_split(labels, fraction=0.3, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(2)
    assert torch.equal(a.labelled, semi_supervised_split(labels, fraction=0.3, seed=5).labelled)


def test_accepts_other_integer_dtypes():
    labels = _labels()
    a = semi_supervised_split(labels, seed=1)
    b = semi_supervised_split(labels.to(torch.int32), seed=1)
    assert torch.equal(a.labelled, b.labelled)


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.01, 2, float("nan"), "0.1", True, None])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"fraction=.*\(0, 1\]"):
        semi_supervised_split(_labels(), fraction=fraction)


def test_other_errors():
    with pytest.raises(ValueError, match="1-D"):
        semi_supervised_split(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="1-D"):
        semi_supervised_split([0, 1, 2])
    with pytest.raises(ValueError, match="integer"):
        semi_supervised_split(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="empty"):
        semi_supervised_split(torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="seed"):
        semi_supervised_split(_labels(), seed=-1)
    with pytest.raises(ValueError, match="min_per_class"):
        semi_supervised_split(_labels(), min_per_class=-1)
