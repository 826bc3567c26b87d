"""Prompt sampling for in-context sparse linear regression (SPEC section 2).

A batch of prompts holds ``n + 1`` examples each: ``x`` is ``(B, n+1, d)``, ``y``
is ``(B, n+1)``. Every model and estimator in the project maps ``(x, y)`` to
``(B, n+1)`` predictions where column ``k`` predicts ``y_k`` from examples
``0..k-1`` only, i.e. column ``k`` is context length ``k``. The excess risk uses
the noiseless target ``f = <w*, x>``.

Streams (``train``, ``val``, ``test``, ...) get independent seeds derived with
:class:`numpy.random.SeedSequence`, so they never share draws.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .config import TaskConfig

STREAMS = ("train", "val", "test", "probe", "eval", "ablation")


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for ``stream``, independent of every other stream of ``seed``."""
    key = zlib.crc32(stream.encode())
    return int(np.random.SeedSequence([seed, key]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator(seed: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, stream))
    return g


@dataclass
class Prompts:
    """A batch of prompts. ``f`` is the noiseless target ``<w*, x>`` for every example."""

    x: torch.Tensor  # (B, N, d)
    y: torch.Tensor  # (B, N)
    w: torch.Tensor  # (B, d)
    f: torch.Tensor  # (B, N)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Prompts":
        return Prompts(*(t.to(device=device, dtype=dtype) for t in (self.x, self.y, self.w, self.f)))

    def slice(self, start: int, stop: int) -> "Prompts":
        return Prompts(self.x[start:stop], self.y[start:stop], self.w[start:stop], self.f[start:stop])


def sample_weights(task: TaskConfig, batch: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s-sparse weights: a uniform support of size s (argsort of uniforms), N(0, tau^2) values on it."""
    dev = gen.device
    support = torch.rand(batch, task.d, generator=gen, device=dev).argsort(dim=1)[:, : task.s]
    values = task.tau * torch.randn(batch, task.s, generator=gen, device=dev, dtype=dtype)
    w = torch.zeros(batch, task.d, device=dev, dtype=dtype)
    return w.scatter_(1, support, values)


def sample_prompts(
    task: TaskConfig,
    batch: int,
    gen: torch.Generator,
    n: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Prompts:
    """Draw ``batch`` prompts with ``n + 1`` examples (default ``n = task.n_max``)."""
    n = task.n_max if n is None else n
    dev = gen.device
    w = sample_weights(task, batch, gen, dtype)
    x = torch.randn(batch, n + 1, task.d, generator=gen, device=dev, dtype=dtype)
    f = torch.einsum("bnd,bd->bn", x, w)
    y = f + task.sigma * torch.randn(batch, n + 1, generator=gen, device=dev, dtype=dtype)
    return Prompts(x, y, w, f)


def fixed_prompts(task: TaskConfig, batch: int, seed: int, stream: str, dtype: torch.dtype = torch.float64) -> Prompts:
    """A reproducible prompt set (validation/test), drawn on CPU so it is identical on every machine."""
    return sample_prompts(task, batch, generator(seed, stream), dtype=dtype)
