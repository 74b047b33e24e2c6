"""Flow-matching Euler sampling, as diffusers 0.42.1 runs it for Qwen-Image.

Reproduces, without importing diffusers:

* ``FlowMatchEulerDiscreteScheduler.set_timesteps`` on the path
  ``QwenImagePipeline.__call__`` takes (it always passes ``sigmas`` and ``mu``):
  ``schedulers/scheduling_flow_match_euler_discrete.py``;
* ``calculate_shift`` from ``pipelines/qwenimage/pipeline_qwenimage.py``;
* the deterministic ``step`` (``prev = sample + (sigma_next - sigma) * v``).

Everything is per request: ``schedule`` is a pure function of the config, the
step count and the image's token count, and ``euler_step`` takes sigmas that
broadcast against the sample, so one call can step many requests that sit at
different points of different schedules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


@dataclass(frozen=True)
class FlowMatchConfig:
    """``FlowMatchEulerDiscreteScheduler``'s registered config (defaults as in
    diffusers). Settings this module does not implement are refused at
    construction instead of being ignored."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    def __post_init__(self):
        unsupported = {
            "use_karras_sigmas": "Karras sigmas",
            "use_exponential_sigmas": "exponential sigmas",
            "use_beta_sigmas": "beta sigmas",
            "invert_sigmas": "inverted sigmas (Mochi)",
            # the stochastic step draws fresh noise every step (a second RNG stream)
            "stochastic_sampling": "stochastic sampling",
        }
        for name, what in unsupported.items():
            if getattr(self, name):
                raise ValueError(f"scheduler config: {name}=True ({what}) is not implemented")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(
                f"scheduler config: time_shift_type must be 'exponential' or 'linear', "
                f"got {self.time_shift_type!r}"
            )
        # The pipeline computes mu from these even when dynamic shifting is off,
        # so a null here would fail there too.
        for name in ("base_shift", "max_shift", "shift", "base_image_seq_len",
                     "max_image_seq_len", "num_train_timesteps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"scheduler config: {name} must be a number, got {value!r}")
        if self.max_image_seq_len == self.base_image_seq_len:
            raise ValueError("scheduler config: max_image_seq_len must differ from base_image_seq_len")
        if self.shift_terminal is not None and self.shift_terminal >= 1:
            raise ValueError(f"scheduler config: shift_terminal must be < 1, got {self.shift_terminal}")

    @classmethod
    def from_dict(cls, config: Mapping) -> FlowMatchConfig:
        """From a ``scheduler_config.json`` mapping. ``_``-prefixed metadata is
        skipped; any other unknown key is refused (we would otherwise drop a
        setting diffusers honours)."""
        known = {f.name for f in fields(cls)}
        name = config.get("_class_name", SCHEDULER_CLASS)
        if name != SCHEDULER_CLASS:
            raise ValueError(f"scheduler config: expected {SCHEDULER_CLASS}, got {name!r}")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"scheduler config: unsupported keys {unknown}")
        return cls(**{k: v for k, v in config.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> FlowMatchConfig:
        """From ``scheduler_config.json`` or the ``scheduler/`` folder holding it."""
        path = Path(path)
        if path.is_dir():
            path = path / "scheduler_config.json"
        return cls.from_dict(json.loads(path.read_text()))


def calculate_shift(image_seq_len: int, config: FlowMatchConfig) -> float:
    """The pipeline's ``mu``: a line through (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift), evaluated (not clamped) at image_seq_len.
    Same float64 operation order as ``pipeline_qwenimage.calculate_shift``."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    intercept = config.base_shift - slope * config.base_image_seq_len
    return image_seq_len * slope + intercept


def _shift(config: FlowMatchConfig, sigmas: np.ndarray, mu: float) -> np.ndarray:
    # numpy float32 throughout: the Python-float constants are "weak" scalars
    # (NEP 50), so each operation rounds to float32 exactly as in diffusers.
    if config.use_dynamic_shifting:
        # time_shift(mu, sigma=1.0, t); `** 1.0` kept because diffusers raises
        # to the power (it is exact, but keeps the operation sequence identical).
        numerator = math.exp(mu) if config.time_shift_type == "exponential" else mu
        return numerator / (numerator + (1 / sigmas - 1) ** 1.0)
    return config.shift * sigmas / (1 + (config.shift - 1) * sigmas)


def schedule(
    config: FlowMatchConfig,
    num_inference_steps: int,
    image_seq_len: int,
    sigmas: Sequence[float] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)`` of one request: float32 tensors of length n and
    n + 1 (a final 0 appended), equal to ``pipe.scheduler.timesteps`` /
    ``.sigmas`` after ``QwenImagePipeline.__call__`` sets them.

    The pipeline passes ``sigmas = linspace(1, 1/n, n)`` (float64, cast to
    float32 by the scheduler) and ``mu = calculate_shift(image_seq_len)``; a
    caller-given ``sigmas`` replaces the linspace and its length sets n, as the
    pipeline's own ``sigmas=`` argument does. ``image_seq_len`` is the packed
    token count (``latents.shape[1]``).
    """
    if sigmas is None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    base = np.array(sigmas).astype(np.float32)
    if base.ndim != 1 or base.size == 0:
        raise ValueError("sigmas must be a non-empty 1-D sequence")
    mu = calculate_shift(image_seq_len, config)
    shifted = _shift(config, base, mu)

    # `if config.shift_terminal:` in diffusers, so 0.0 means off as None does.
    if config.shift_terminal:
        one_minus = 1 - shifted
        if one_minus[-1] == 0:
            # diffusers divides 0 by 0 here and returns a NaN schedule (e.g. one
            # step: the only sigma is 1); refuse rather than denoise with NaNs.
            raise ValueError(
                "shift_terminal needs a last shifted sigma below 1; with "
                f"{base.size} step(s) diffusers' schedule would be NaN"
            )
        scale = one_minus[-1] / (1 - config.shift_terminal)
        shifted = 1 - (one_minus / scale)

    sigma_t = torch.from_numpy(np.asarray(shifted)).to(dtype=torch.float32, device=device)
    timesteps = sigma_t * config.num_train_timesteps
    sigma_t = torch.cat([sigma_t, torch.zeros(1, device=sigma_t.device)])
    return timesteps, sigma_t


def euler_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
) -> torch.Tensor:
    """One deterministic ``FlowMatchEulerDiscreteScheduler.step``:
    ``sample.float() + (sigma_next - sigma) * model_output``, returned in
    ``model_output.dtype``.

    ``sigma`` / ``sigma_next`` are the request's ``sigmas[i]`` and
    ``sigmas[i + 1]`` (float32, from ``schedule``): scalars, or tensors that
    broadcast against ``sample`` (e.g. ``[B, 1, 1]`` or one per token) to step
    many requests in one call.

    Dtypes as in diffusers, where ``dt`` is a 0-dim float32 tensor on the
    sample's device: the sample is upcast to float32, and ``dt * model_output``
    stays in ``model_output``'s dtype, because a 0-dim tensor does not promote.
    torch then reads dt in that dtype too (the CPU casts it to the common
    dtype first; CUDA's binary kernels load both operands as the common dtype),
    so for bf16/fp16 dt is rounded before the multiply. A batched dt of shape
    [B, 1, 1] would promote the product to float32, so it is cast here.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sample.device)
    dt = sigma_next - sigma
    product = model_output * dt.to(model_output.dtype)
    prev = sample.to(torch.float32) + product
    return prev.to(model_output.dtype)
