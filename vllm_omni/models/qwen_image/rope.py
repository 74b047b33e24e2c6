"""Qwen-Image's 3-axis RoPE (diffusers' ``QwenEmbedRope`` with
``scale_rope=True``), per packed token.

The head dimension is split into three bands (``axes_dims_rope``: frame,
row, column). Each band rotates its channel pairs by position x
theta^(-2j / band), theta = 10000, as a complex multiplication in float32.
An image of (f, h, w) patches puts frame i at position i and centres rows
and columns: row r of h sits at r - (h - h // 2), ..., so the first
h - h // 2 rows are negative. Its text tokens take positions m, m + 1, ...
on all three bands, with m = max(h // 2, w // 2). The factors are computed on
the CPU, as diffusers does, then moved to the device; they are applied
by ``vllm_omni.kernels.dit.qk_norm_rope``.
"""

from functools import lru_cache

import torch

THETA = 10000


class QwenRope:
    def __init__(self, axes_dims: tuple[int, int, int]):
        if any(d % 2 for d in axes_dims):
            raise ValueError(f"axes_dims_rope must be even, got {axes_dims}")
        self.inv_freqs = [1.0 / torch.pow(THETA, torch.arange(0, d, 2, device="cpu").float().div(d))
                          for d in axes_dims]

    def _band(self, axis: int, positions: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(positions, self.inv_freqs[axis])
        return torch.polar(torch.ones_like(angles), angles)

    @lru_cache(maxsize=256)
    def image(self, frames: int, rows: int, cols: int) -> torch.Tensor:
        """[frames * rows * cols, head_dim / 2] complex factors, row-major."""
        def centred(n):
            return torch.cat([torch.arange(-(n - n // 2), 0), torch.arange(n // 2)])

        shape = (frames, rows, cols)
        bands = [self._band(0, torch.arange(frames))[:, None, None],
                 self._band(1, centred(rows))[None, :, None],
                 self._band(2, centred(cols))[None, None, :]]
        bands = [b.expand(*shape, -1) for b in bands]
        return torch.cat(bands, dim=-1).reshape(frames * rows * cols, -1)

    @lru_cache(maxsize=256)
    def text(self, length: int, rows: int, cols: int) -> torch.Tensor:
        """[length, head_dim / 2] complex factors of a text beside that image."""
        positions = torch.arange(length) + max(rows // 2, cols // 2)
        return torch.cat([self._band(axis, positions) for axis in range(3)], dim=-1)

    def freqs(self, txt_lens, img_shapes, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed factors of every sequence's text tokens and image tokens."""
        txt = torch.cat([self.text(n, h, w) for n, (_, h, w) in zip(txt_lens, img_shapes)])
        img = torch.cat([self.image(*shape) for shape in img_shapes])
        return txt.to(device), img.to(device)

