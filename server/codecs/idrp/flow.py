"""Bijections of the IDRP flow, each with ``forward``, ``inverse`` and ``log_det``.

Every layer maps [B, d] -> [B, d]. ``forward`` returns ``(y, log_det)`` with
``log_det`` [B] = log|det dy/dx|; ``inverse`` returns ``x``. Fixed structure
(rotation, scales, permutations) lives in buffers, so a state dict alone
defines the bijection.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Bijection(nn.Module):
    """Interface of a flow layer on [B, d] tensors."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:  # noqa: D102
        raise NotImplementedError


class PCARotation(Bijection):
    """``y = (x - mean) @ R.T`` with ``R`` orthogonal (rows = principal directions).

    Args:
        mean: [d] training mean. rotation: [d, d] orthogonal, rows by decreasing variance.
    """

    mean: torch.Tensor
    rotation: torch.Tensor

    def __init__(self, mean: torch.Tensor, rotation: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("rotation", rotation.float().clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = (x - self.mean) @ self.rotation.T
        return y, x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y @ self.rotation).add_(self.mean)  # the same sum, without a second [B, d]


class FixedScale(Bijection):
    """Per-dimension division by a fixed positive scale: ``y = x / scale``.

    Args:
        scale: [d] positive (e.g. principal standard deviations, floored).
    """

    scale: torch.Tensor

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.float().clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = -torch.log(self.scale).sum().expand(x.shape[0])
        return x / self.scale, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale


class Permutation(Bijection):
    """Fixed permutation of dimensions: ``y = x[:, perm]`` (log-det 0).

    Args:
        perm: [d] int64 permutation.
    """

    perm: torch.Tensor
    inv_perm: torch.Tensor

    def __init__(self, perm: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("perm", perm.long().clone())
        self.register_buffer("inv_perm", torch.argsort(self.perm))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.inv_perm]


class SwiGLU(nn.Module):
    """``W_out(silu(W_a x) * W_b x)``: [B, d_in] -> [B, d_out]."""

    def __init__(self, d_in: int, hidden: int, d_out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate_value = nn.Linear(d_in, 2 * hidden)
        self.out = nn.Linear(hidden, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.gate_value(x).chunk(2, dim=-1)
        return self.out(self.dropout(F.silu(gate) * value))


class ResidualSwiGLU(nn.Module):
    """Pre-norm residual block: ``h + SwiGLU(LayerNorm(h))`` on [B, hidden]."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = SwiGLU(hidden, hidden, hidden, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))


class CouplingNet(nn.Module):
    """LayerNorm -> Linear -> residual SwiGLU blocks -> Linear (zero-initialised).

    Maps x1 [B, d_in] to raw (s, t) [B, d_out] each; zero output at init makes
    the coupling the identity.
    """

    def __init__(
        self, d_in: int, d_out: int, hidden: int, n_res: int, dropout: float
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.inp = nn.Linear(d_in, hidden)
        self.blocks = nn.Sequential(*[ResidualSwiGLU(hidden, dropout) for _ in range(n_res)])
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 2 * d_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks(self.inp(self.norm(x1)))
        s, t = self.out(self.out_norm(h)).chunk(2, dim=-1)
        return s, t


class AffineCoupling(Bijection):
    """RealNVP coupling: ``y1 = x1``, ``y2 = x2 * exp(s) + t`` with ``[s, t] = Net(x1)``.

    ``s = c * tanh(s_raw / c)`` and ``t = b * tanh(t_raw / b)`` keep the scale and
    shift bounded, so the inverse stays well conditioned. ``x1`` is the first
    ``d1 = d // 2`` dims.

    Args:
        dim: d. hidden, n_res, dropout: subnet size. scale_clamp: c. shift_bound: b.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_res: int,
        dropout: float = 0.0,
        scale_clamp: float = 1.0,
        shift_bound: float = 10.0,
    ) -> None:
        super().__init__()
        self.d1 = dim // 2
        self.scale_clamp = float(scale_clamp)
        self.shift_bound = float(shift_bound)
        self.net = CouplingNet(self.d1, dim - self.d1, hidden, n_res, dropout)

    def _scale_shift(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_raw, t_raw = self.net(x1)
        s = self.scale_clamp * torch.tanh(s_raw / self.scale_clamp)
        t = self.shift_bound * torch.tanh(t_raw / self.shift_bound)
        return s, t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, : self.d1], x[:, self.d1 :]
        s, t = self._scale_shift(x1)
        return torch.cat([x1, x2 * torch.exp(s) + t], dim=1), s.sum(dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[:, : self.d1], y[:, self.d1 :]
        s, t = self._scale_shift(y1)
        return torch.cat([y1, (y2 - t) / torch.exp(s)], dim=1)
