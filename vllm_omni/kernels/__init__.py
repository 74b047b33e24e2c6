"""Attention for the denoising forward: packed variable-length sequences,
every query attending to every key of its own sequence (no causal mask).

``bidirectional_attention`` dispatches to the plain PyTorch reference in
``reference.py``; faster kernels plug in here behind the same signature.
"""

from vllm_omni.kernels.reference import (
    SequenceBatch,
    bidirectional_attention_reference,
)

__all__ = ["SequenceBatch", "bidirectional_attention"]


def bidirectional_attention(q, k, v, batch: SequenceBatch, scale: float):
    return bidirectional_attention_reference(q, k, v, batch, scale)
