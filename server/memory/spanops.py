"""A read's elementwise steps over score spans, kept off torch's thread pool on CPU.

torch runs elementwise ops on a few thousand floats (``exp_`` from ~3k, ``mul_``
and ``masked_fill_`` from ~32k) across its intra-op threads. A read is a few
microseconds of such work, and a parallel region costs its threads' wake-up: on a
busy machine, or under concurrent reads that each open regions of their own, that
measured 1.4-2 ms per ``exp_`` of 18k scores against 10 us in numpy, and made a read
of a 3,000-memory bank spend most of its time waiting for threads. numpy's
elementwise loops are single-threaded and vectorised, and concurrent reads run them
side by side (they release the GIL). Off the CPU the torch ops are kept.
"""

from __future__ import annotations

import numpy as np
import torch


def _cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def scale_(scores: torch.Tensor, factors: torch.Tensor) -> None:
    """``scores [Q, c] *= factors [c]`` in place."""
    if _cpu(scores):
        s = scores.numpy()
        np.multiply(s, factors.numpy(), out=s)
    else:
        scores.mul_(factors)


def mask_(scores: torch.Tensor, keep: torch.Tensor) -> None:
    """Scores [Q, c] of the columns where ``keep`` [c] is False become -inf."""
    if _cpu(scores):
        np.copyto(scores.numpy(), -np.inf, where=~keep.numpy())
    else:
        scores.masked_fill_(~keep, -np.inf)


def exp_sum_(scores: torch.Tensor, shift: torch.Tensor | float,
             temperature: float) -> torch.Tensor:
    """Turns scores [Q, c] into softmax weights ``exp((s - shift) / T)`` in place and
    returns their sums [Q]; ``shift``: one value, or [Q, 1]."""
    if not _cpu(scores):
        return scores.sub_(shift).div_(temperature).exp_().sum(dim=1)
    s = scores.numpy()
    np.subtract(s, shift.numpy() if isinstance(shift, torch.Tensor) else shift, out=s)
    np.divide(s, temperature, out=s)
    np.exp(s, out=s)
    return torch.from_numpy(s.sum(axis=1, dtype=np.float32))


def gather(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``values [n][idx [c]]`` -> [c]."""
    if _cpu(values):
        return torch.from_numpy(np.take(values.numpy(), idx.numpy()))
    return values.index_select(0, idx)


def copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src`` (same shape)."""
    if _cpu(dst) and _cpu(src):
        np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)
