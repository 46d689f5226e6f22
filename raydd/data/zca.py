"""ZCA whitening of image datasets.

Matches what MTT (Cazenavette et al., CVPR 2022) uses, i.e. kornia's
``ZCAWhitening(eps=0.1, compute_inv=True)`` fitted on the whole training set: per-image
flattening, mean-centring, unbiased covariance ``C = U diag(S) U^T`` and
``W = U diag(1/sqrt(S+eps)) U^T`` (inverse ``U diag(sqrt(S+eps)) U^T``).
The covariance is accumulated in float64 over row chunks; the fitted matrices are stored
as float32.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

__all__ = ["ZCANotFittedError", "ZCAWhitening"]

_STATE_KEYS = ("eps", "image_shape", "mean", "eigenvalues", "transform_matrix", "inverse_matrix")


class ZCANotFittedError(RuntimeError, ValueError):
    """Raised when a ZCAWhitening is used before ``fit`` (catchable as RuntimeError or ValueError)."""


class ZCAWhitening:
    """ZCA whitening fitted on a training set of images ``[N, C, H, W]``."""

    def __init__(self, eps: float = 0.1, chunk_size: int = 4096) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"ZCAWhitening eps={eps!r} is invalid; expected a finite number > 0")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"ZCAWhitening chunk_size={chunk_size!r} is invalid; expected an int >= 1")
        self.eps = float(eps)
        self.chunk_size = chunk_size
        self.image_shape: tuple[int, int, int] | None = None
        self.mean: Tensor | None = None  # [D]
        self.eigenvalues: Tensor | None = None  # [D], covariance spectrum S (descending)
        self.transform_matrix: Tensor | None = None  # [D, D], W
        self.inverse_matrix: Tensor | None = None  # [D, D], W^-1

    def __repr__(self) -> str:
        return f"ZCAWhitening(eps={self.eps}, image_shape={self.image_shape})"

    @property
    def fitted(self) -> bool:
        return self.transform_matrix is not None

    # ------------------------------------------------------------------ fitting
    def fit(self, images: Tensor) -> "ZCAWhitening":
        """Fit mean and whitening matrices on ``images`` [N, C, H, W] (N >= 2); returns self."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"ZCAWhitening.fit images {shape} is invalid; expected a tensor [N, C, H, W]")
        n = images.shape[0]
        if n < 2:
            raise ValueError(f"ZCAWhitening.fit got {n} image(s); need at least 2 to estimate a covariance")
        flat = images.reshape(n, -1)
        d = flat.shape[1]
        device = images.device
        total = torch.zeros(d, dtype=torch.float64, device=device)
        gram = torch.zeros(d, d, dtype=torch.float64, device=device)
        for start in range(0, n, self.chunk_size):
            chunk = flat[start:start + self.chunk_size].to(torch.float64)
            total += chunk.sum(0)
            gram.addmm_(chunk.T, chunk)
        mean = total / n
        cov = (gram - n * torch.outer(mean, mean)) / (n - 1)  # unbiased, like kornia
        cov = 0.5 * (cov + cov.T)
        # Symmetric PSD covariance: its SVD is its eigendecomposition (eigh is faster and exact in form).
        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.flip(0).clamp_min(0.0)
        evecs = evecs.flip(1)
        w = (evecs * (evals + self.eps).rsqrt()) @ evecs.T
        w_inv = (evecs * (evals + self.eps).sqrt()) @ evecs.T
        self.image_shape = tuple(int(s) for s in images.shape[1:])
        self.mean = mean.float()
        self.eigenvalues = evals.float()
        self.transform_matrix = w.float()
        self.inverse_matrix = w_inv.float()
        return self

    # ------------------------------------------------------------------ applying
    def _check(self, images: Tensor, what: str) -> None:
        if not self.fitted:
            raise ZCANotFittedError(f"ZCAWhitening.{what} called before fit; call fit(train_images) first")
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"ZCAWhitening.{what} images {shape} do not match the fitted shape; expected [N, {', '.join(map(str, self.image_shape))}]"
            )
        if not images.is_floating_point():
            raise ValueError(f"ZCAWhitening.{what} images dtype {images.dtype} is invalid; expected a floating-point tensor")

    def transform(self, images: Tensor) -> Tensor:
        """Whiten ``images`` [N, C, H, W]; same shape, dtype and device out (differentiable)."""
        self._check(images, "transform")
        mean = self.mean.to(images.device, images.dtype)
        w = self.transform_matrix.to(images.device, images.dtype)
        flat = images.reshape(images.shape[0], -1)
        return ((flat - mean) @ w).reshape(images.shape)  # W is symmetric

    __call__ = transform

    def whiten(self, data):
        """An ImageDataset with its images whitened (labels, info, split and source kept)."""
        return dataclasses.replace(data, images=self.transform(data.images))

    def inverse(self, images: Tensor) -> Tensor:
        """Undo ``transform`` (e.g. to view whitened or distilled images)."""
        self._check(images, "inverse")
        mean = self.mean.to(images.device, images.dtype)
        w_inv = self.inverse_matrix.to(images.device, images.dtype)
        flat = images.reshape(images.shape[0], -1)
        return (flat @ w_inv + mean).reshape(images.shape)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors only (safe for ``torch.load(weights_only=True)`` / safetensors)."""
        if not self.fitted:
            raise ZCANotFittedError("ZCAWhitening.state_dict called before fit; call fit(train_images) first")
        return {
            "eps": torch.tensor(self.eps, dtype=torch.float64),
            "image_shape": torch.tensor(self.image_shape, dtype=torch.int64),
            "mean": self.mean.detach().cpu().clone(),
            "eigenvalues": self.eigenvalues.detach().cpu().clone(),
            "transform_matrix": self.transform_matrix.detach().cpu().clone(),
            "inverse_matrix": self.inverse_matrix.detach().cpu().clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "ZCAWhitening":
        """Rebuild a fitted ZCAWhitening from ``state_dict()`` output."""
        if not isinstance(state, dict):
            raise ValueError(f"ZCAWhitening state {type(state).__name__} is invalid; expected a dict of tensors")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"ZCAWhitening state is missing key(s) {missing}; expected {list(_STATE_KEYS)}")
        shape = tuple(int(s) for s in torch.as_tensor(state["image_shape"]).tolist())
        if len(shape) != 3:
            raise ValueError(f"ZCAWhitening state image_shape={shape} is invalid; expected (C, H, W)")
        d = math.prod(shape)
        expected = {"mean": (d,), "eigenvalues": (d,), "transform_matrix": (d, d), "inverse_matrix": (d, d)}
        for key, want in expected.items():
            got = tuple(torch.as_tensor(state[key]).shape)
            if got != want:
                raise ValueError(f"ZCAWhitening state {key} has shape {got}; expected {want} for image_shape {shape}")
        zca = cls(eps=float(torch.as_tensor(state["eps"]).item()))
        zca.image_shape = shape  # type: ignore[assignment]
        for key in expected:
            setattr(zca, key, torch.as_tensor(state[key]).detach().cpu().float().clone())
        return zca
