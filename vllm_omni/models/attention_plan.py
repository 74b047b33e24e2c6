"""What one denoising forward attends to, sequence by sequence.

Each sequence (a request's canvas) runs queries for canvas positions
``[q_start, q_end)``. Its keys are always the whole canvas: the fresh keys of
those positions, and for the positions outside them the keys cached at the
last refresh (Fast-dLLM's prefix and dual caches). A forward over the whole
canvas can record its keys as the new cache.

The plan is built by the denoiser and handed down through the model; each
attention layer calls ``attend`` with its index.
"""

from dataclasses import dataclass

import torch

from vllm_omni.kernels import SequenceBatch, bidirectional_attention

# Per layer: (keys, values), each [canvas_length, num_kv_heads, head_dim].
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SequencePlan:
    length: int  # the canvas length
    q_start: int
    q_end: int
    cache: LayerKV | None = None  # keys of the positions outside the queries
    record: bool = False  # keep this forward's keys (queries cover the canvas)


class AttentionPlan:
    def __init__(self, seqs: list[SequencePlan]):
        self.seqs = seqs
        self.queries = SequenceBatch.from_lengths([s.q_end - s.q_start for s in seqs])
        self.uses_cache = any(s.cache is not None for s in seqs)
        self.keys = (
            SequenceBatch.from_lengths([s.length for s in seqs]) if self.uses_cache else None
        )
        self.recorded: list[LayerKV] = [[] for _ in seqs]

    def positions(self, device) -> torch.Tensor:
        return torch.cat([torch.arange(s.q_start, s.q_end) for s in self.seqs]).to(device)

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        for i, seq in enumerate(self.seqs):
            if seq.record:
                rows = slice(self.queries.starts[i], self.queries.starts[i] + self.queries.lens[i])
                self.recorded[i].append((k[rows].clone(), v[rows].clone()))
        if not self.uses_cache:
            return bidirectional_attention(q, k, v, self.queries, scale)
        keys, values = [], []
        for i, seq in enumerate(self.seqs):
            rows = slice(self.queries.starts[i], self.queries.starts[i] + self.queries.lens[i])
            if seq.cache is None:
                keys.append(k[rows])
                values.append(v[rows])
                continue
            ck, cv = seq.cache[layer]
            keys += [ck[: seq.q_start], k[rows], ck[seq.q_end :]]
            values += [cv[: seq.q_start], v[rows], cv[seq.q_end :]]
        return bidirectional_attention(
            q, torch.cat(keys), torch.cat(values), self.queries, scale, self.keys
        )
