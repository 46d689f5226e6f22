"""raydd's stored experts in the reference codes' replay-buffer layout and back (issue 24's conversion), through
``raydd store export-buffer`` too; files that are not buffers get one line."""
from __future__ import annotations

import pickle

import pytest
import torch

from raydd.cli import main
from raydd.models.flat import ParamLayout
from raydd.store.reference_buffer import expert_epochs, flat_epochs, load_reference_buffer, save_reference_buffer


def test_a_stored_expert_round_trips_through_the_reference_layout(digits_experts, tmp_path):
    infos = digits_experts.list(kind="expert")
    with digits_experts.open(infos[0].trajectory_id) as trajectory:
        layout = ParamLayout.from_list(trajectory.meta["param_layout"])
        expert = expert_epochs(trajectory)
        stored = [trajectory.params(e, torch.float32) for e in sorted(trajectory.epochs)]
    assert len(expert) == len(stored) and [tuple(t.shape) for t in expert[0]] == list(layout.shapes)
    back = load_reference_buffer(save_reference_buffer([expert], tmp_path / "sub" / "replay_buffer_0.pt"))
    flats = flat_epochs(back[0], layout)
    assert all(torch.equal(a, b) for a, b in zip(flats, stored)) and len(flats) == len(stored)


def test_export_buffer_through_the_command_line(digits_experts, tmp_path, capsys):
    out = tmp_path / "buffers" / "replay_buffer_0.pt"
    assert main(["store", "export-buffer", str(digits_experts.root), str(out), "--kind", "expert",
                 "--epochs", "2"]) == 0
    assert "written to" in capsys.readouterr().out
    buffer = load_reference_buffer(out)
    infos = digits_experts.list(kind="expert")
    assert len(buffer) == len(infos) and all(len(expert) == 3 for expert in buffer)  # epochs 0, 1, 2
    with digits_experts.open(infos[0].trajectory_id) as trajectory:
        layout = ParamLayout.from_list(trajectory.meta["param_layout"])
        assert torch.equal(flat_epochs(buffer[0], layout)[2], trajectory.params(2, torch.float32))
    assert main(["store", "export-buffer", str(digits_experts.root), str(out), "--kind", "teacher"]) == 2
    assert main(["store", "export-buffer", str(digits_experts.root), str(out), "--epochs", "-1"]) == 2
    err = capsys.readouterr().err
    assert "no trajectories in" in err and "--epochs=-1 is invalid" in err


class _NotATensor:
    pass


@pytest.mark.parametrize("content, message", [
    ({"not": "a list"}, r"holds dict, expected a list of experts"),
    ([[[torch.zeros(2)], "x"]], r"holds list, expected a list of experts"),
    (_NotATensor(), r"not a replay buffer torch.load can read safely"),  # an arbitrary pickle is refused
    (b"garbage", None),
])
def test_files_that_are_not_buffers_get_one_line(tmp_path, content, message):
    path = tmp_path / "replay_buffer_0.pt"
    if content == b"garbage":
        path.write_bytes(b"\x00not a torch file")
        message = r"not a replay buffer torch.load can read safely"
    elif isinstance(content, _NotATensor):
        path.write_bytes(pickle.dumps(content))
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message) as err:
        load_reference_buffer(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_buffer_of_another_model_is_refused_naming_the_tensor():
    layout = ParamLayout(("w", "b"), ((2, 3), (2,)))
    assert torch.equal(flat_epochs([[torch.ones(2, 3), torch.zeros(2)]], layout)[0], torch.tensor([1.0] * 6 + [0.0] * 2))
    with pytest.raises(ValueError, match=r"epoch 0, tensor 1 \(b\) has shape \(3,\), the model's is \(2,\)"):
        flat_epochs([[torch.ones(2, 3), torch.zeros(3)]], layout)
    with pytest.raises(ValueError, match=r"epoch 1 holds 1 parameter tensors, the model has 2"):
        flat_epochs([[torch.ones(2, 3), torch.zeros(2)], [torch.ones(2, 3)]], layout)
