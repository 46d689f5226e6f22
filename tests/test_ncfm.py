"""NCFM: eq. 8's characteristic-function discrepancy in float64, its published rows, and a run through the CLI."""
from __future__ import annotations

import math

import pytest
import torch

from raydd.cli import main
from raydd.methods import load_synthetic, make_config
from raydd.methods.ncfm import characteristic_discrepancy

pytestmark = pytest.mark.usefixtures("single_thread")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def eq8(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 8 with complex numbers: Φ(t) = mean exp(j⟨t, x⟩); amplitude |Φx| − |Φy|, phase angle difference."""
    phi_x = torch.exp(1j * (t @ x.T)).mean(1)
    phi_y = torch.exp(1j * (t @ y.T)).mean(1)
    amplitude = (phi_x.abs() - phi_y.abs()) ** 2
    phase = 2 * phi_x.abs() * phi_y.abs() * (1 - torch.cos(phi_x.angle() - phi_y.angle()))
    return (alpha * amplitude + (1 - alpha) * phase).sqrt().mean()


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.1])
def test_the_discrepancy_is_eq8_in_float64(alpha):
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(50, 16, generator=gen, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(7, 16, generator=gen, dtype=torch.float64), dim=1)
    t = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    ours = characteristic_discrepancy(x, y, t, alpha)
    assert torch.isclose(ours, eq8(x, y, t, alpha), rtol=1e-12, atol=0)
    if alpha == 0.5:  # amplitude + phase = |Φx − Φy|²: at α = 0.5 the mean of |Φx − Φy| / √2
        phi = torch.exp(1j * (t @ x.T)).mean(1) - torch.exp(1j * (t @ y.T)).mean(1)
        assert torch.isclose(ours, phi.abs().mean() / math.sqrt(2), rtol=1e-12, atol=0)
    same = characteristic_discrepancy(x, x, t, alpha)
    assert same < 1e-5  # identical distributions: only the phase clamp's sqrt(1e-12 · (1 − α)) remains


def test_defaults_are_the_papers_and_the_codes():
    cfg = make_config("ncfm", "cifar10", 10)
    assert (cfg.lr_img, cfg.weight_decay, cfg.amplitude_weight, cfg.num_freqs, cfg.loss_scale) == \
        (1e-3, 5e-4, 0.5, 1024, 300.0)
    assert (cfg.num_experts, cfg.batch_real, cfg.step_per_class, cfg.plateau_patience) == (20, 1024, True, 500)
    assert cfg.planned_iterations == 20000
    (need,) = cfg.needs()
    assert dict(need.recipe_config) == {"batch_size": 128, "dsa_strategy": "color_crop"}


@pytest.fixture(scope="module")
def ncfm_pool(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("ncfm") / "store")
    assert main(["farm", "--store", store, "--recipe", "pretrain", "--epochs", "2", "--width", "16", "--depth", "2",
                 "--trajectories", "2", "--set", "batch_size=128", "--set", "dsa_strategy=color_crop", "--backend",
                 "local", "--quiet"]) == 0
    return store


def test_the_sampling_network_ascends_the_loss_the_images_descend(ncfm_pool, digits):
    from raydd.methods import get_method
    from raydd.store import TrajectoryStore

    train, _ = digits
    cfg = make_config("ncfm", "digits", 1, num_experts=2, batch_real=32, num_freqs=32, sampling_net=True,
                      lr_sampling_net=0.05)
    method = get_method("ncfm")(cfg, train, TrajectoryStore(ncfm_pool), device="cpu", seed=0)
    gen = torch.Generator().manual_seed(1)
    z_real = torch.randn(40, method.feature_dim, generator=gen)
    z_syn = torch.randn(4, method.feature_dim, generator=gen)
    noise = torch.randn(2, method.feature_dim, generator=gen)  # K = 32 / 16 components

    def term():
        method._frequencies = [noise]
        return method._class_term(z_real, z_syn, None)[0]

    before = [p.detach().clone() for p in method.sampler.parameters()]
    loss = term()
    loss.backward(inputs=list(method.sampler.parameters()))
    method.sampler_optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, method.sampler.parameters()))
    with torch.no_grad():
        assert term() > loss  # one ascent step of ψ raises the discrepancy on the same inputs
    method.step()  # a whole iteration: ψ moves (the released code's ψ would not)
    assert any(not torch.equal(a, b) for a, b in zip(before, method.sampler.parameters()))


def test_farm_and_condense_through_the_cli(tmp_path, capsys):
    store = str(tmp_path / "store")
    code, _, err = run(capsys, "condense", "--method", "ncfm", "--dataset", "digits", "--ipc", "1", "--store", store,
                       "--set", "num_experts=2")
    assert code == 2 and "--set batch_size=128 --set dsa_strategy=color_crop" in err, err
    code, _, err = run(capsys, "farm", "--store", store, "--recipe", "pretrain", "--epochs", "2", "--width", "16",
                       "--depth", "2", "--trajectories", "2", "--set", "batch_size=128", "--set",
                       "dsa_strategy=color_crop", "--backend", "local", "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "condense", "--method", "ncfm", "--dataset", "digits", "--ipc", "1", "--store", store,
                       "--iterations", "2", "--set", "num_experts=2", "--set", "batch_real=32", "--set",
                       "num_freqs=64", "--set", "amplitude_weight=0.8", "--out", str(tmp_path / "n.safetensors"),
                       "--quiet")
    assert code == 0, err
    syn = load_synthetic(tmp_path / "n.safetensors")
    assert syn.method == "ncfm" and len(syn) == 40 and syn.config["amplitude_weight"] == 0.8  # 4 decoded per stored
    code, _, err = run(capsys, "condense", "--method", "ncfm", "--dataset", "digits", "--ipc", "1", "--store", store,
                       "--iterations", "2", "--set", "num_experts=2", "--set", "batch_real=32", "--set",
                       "num_freqs=64", "--set", "sampling_net=true", "--out", str(tmp_path / "psi.safetensors"),
                       "--quiet")
    assert code == 0, err
    assert load_synthetic(tmp_path / "psi.safetensors").config["sampling_net"] is True
    code, _, err = run(capsys, "condense", "--method", "ncfm", "--dataset", "digits", "--ipc", "1", "--set",
                       "amplitude_weight=2")
    assert code == 2 and "amplitude_weight" in err and len([ln for ln in err.splitlines() if ln.strip()]) == 1
