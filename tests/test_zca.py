import io

import pytest
import torch

from raydd.data.zca import ZCANotFittedError, ZCAWhitening


def _correlated_images(n=3000, shape=(3, 4, 4), seed=0, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    d = shape[0] * shape[1] * shape[2]
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    mix = q * torch.linspace(1.0, 4.0, d, dtype=torch.float64)  # rotated, well-conditioned
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    x = z @ mix + 3.0  # strongly correlated pixels with a non-zero mean
    return x.float().reshape(n, *shape)


def _cov(flat):
    flat = flat.double()
    centred = flat - flat.mean(0)
    return centred.T @ centred / (flat.shape[0] - 1)


def test_round_trip():
    x = _correlated_images()
    zca = ZCAWhitening().fit(x)
    y = zca.transform(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(zca.inverse(y), x, rtol=1e-4, atol=1e-3)
    assert zca(x).shape == x.shape


def test_whitened_covariance():
    x = _correlated_images()
    zca = ZCAWhitening(eps=0.1).fit(x)
    y = zca.transform(x).reshape(x.shape[0], -1)
    # Matches U diag(S/(S+eps)) U^T, which is ~identity since every S >> eps here.
    s = _cov(x.reshape(x.shape[0], -1))
    evals, evecs = torch.linalg.eigh(s)
    expected = (evecs * (evals / (evals + 0.1))) @ evecs.T
    cov_y = _cov(y)
    torch.testing.assert_close(cov_y, expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(cov_y, torch.eye(cov_y.shape[0], dtype=cov_y.dtype), rtol=0, atol=2e-2)
    torch.testing.assert_close(y.mean(0), torch.zeros(y.shape[1]), rtol=0, atol=1e-3)


def test_weak_directions_are_shrunk_not_amplified():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 1, 4, 4, generator=g)
    x[:, :, :2] *= 0.01  # half the pixels have variance 1e-4 << eps
    y = ZCAWhitening(eps=0.1).fit(x).transform(x).reshape(4000, -1)
    var = y.var(0)
    assert (var[:8] < 1e-2).all()  # S/(S+eps) ~ 1e-3
    assert ((var[8:] - 1 / 1.1).abs() < 0.1).all()  # S/(S+eps) ~ 1/1.1


def test_matches_direct_formula_and_chunking():
    x = _correlated_images(n=500, shape=(2, 3, 3))
    flat = x.reshape(500, -1).double()
    cov = _cov(flat)
    u, s, _ = torch.linalg.svd(cov)
    w = u @ torch.diag(1.0 / torch.sqrt(s + 0.1)) @ u.T
    w_inv = u @ torch.diag(torch.sqrt(s + 0.1)) @ u.T
    a = ZCAWhitening().fit(x)
    b = ZCAWhitening(chunk_size=7).fit(x)
    torch.testing.assert_close(a.transform_matrix.double(), w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.inverse_matrix.double(), w_inv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.eigenvalues.double(), s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.mean.double(), flat.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.transform_matrix, b.transform_matrix)
    assert a.transform_matrix.dtype == torch.float32


def test_other_dtypes_and_gradients():
    x = _correlated_images(n=300, shape=(1, 3, 3))
    zca = ZCAWhitening().fit(x.double())
    x64 = x.double().requires_grad_()
    y = zca.transform(x64)
    assert y.dtype == torch.float64
    y.square().sum().backward()
    assert x64.grad is not None and torch.isfinite(x64.grad).all()


def test_errors_before_fit():
    zca = ZCAWhitening()
    x = torch.rand(4, 1, 2, 2)
    for call in (zca.transform, zca.inverse):
        with pytest.raises(ZCANotFittedError, match="before fit"):
            call(x)
    with pytest.raises(RuntimeError):
        zca.state_dict()
    with pytest.raises(ValueError):  # also catchable as ValueError
        zca.transform(x)
    assert not zca.fitted


def test_shape_and_input_errors():
    zca = ZCAWhitening().fit(torch.rand(10, 1, 2, 2))
    assert zca.fitted and zca.image_shape == (1, 2, 2)
    with pytest.raises(ValueError, match=r"expected \[N, 1, 2, 2\]"):
        zca.transform(torch.rand(10, 1, 3, 3))
    with pytest.raises(ValueError, match="shape"):
        zca.inverse(torch.rand(4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        zca.transform(torch.zeros(3, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ZCAWhitening().fit(torch.rand(10, 4))
    with pytest.raises(ValueError, match="at least 2"):
        ZCAWhitening().fit(torch.rand(1, 1, 2, 2))
    for bad in (0, -0.1, float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="eps"):
            ZCAWhitening(eps=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        ZCAWhitening(chunk_size=0)


def test_state_dict_round_trip_plain_tensors():
    x = _correlated_images(n=400, shape=(1, 3, 3))
    zca = ZCAWhitening(eps=0.05).fit(x)
    state = zca.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = ZCAWhitening.from_state_dict(torch.load(buf, weights_only=True))
    assert restored.eps == pytest.approx(0.05) and restored.image_shape == (1, 3, 3)
    torch.testing.assert_close(restored.transform(x), zca.transform(x))
    torch.testing.assert_close(restored.inverse(x), zca.inverse(x))


def test_from_state_dict_errors():
    state = ZCAWhitening().fit(torch.rand(10, 1, 2, 2)).state_dict()
    broken = dict(state)
    del broken["mean"]
    with pytest.raises(ValueError, match="missing"):
        ZCAWhitening.from_state_dict(broken)
    bad_shape = dict(state, transform_matrix=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="transform_matrix"):
        ZCAWhitening.from_state_dict(bad_shape)
    with pytest.raises(ValueError, match="dict"):
        ZCAWhitening.from_state_dict([1, 2])
