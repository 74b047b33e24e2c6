"""Host time of a block-causal engine step outside the model, on the CPU.

What the GPU waits for once the model forward is a CUDA graph: building each
forward's plan (``diffusion/block_plan.py``, ``models/attention_plan.py``),
moving it to the device (eager) or into the graphs' static buffers, the
commits and the look at the blocks. The model here is a stand-in whose
forward costs nothing but what every attention layer does on the host with
the plan (``--layers`` calls of ``attend`` minus the kernel), so the times
are the denoiser's own.

    python benchmarks/block_host_overhead.py --batch 1 32 128 --context 768 --steps 2

Each row: one engine step of ``batch`` requests in the steady state (each
stores its last block and decodes the next in ``--steps`` forwards, the
first one shared with the store), eager and through the graphs' static
forward (``static``: the copy into the fixed buffers, uncaptured). ``ms`` is
per forward; the parts are cProfile's cumulative times per forward.
"""

import argparse

import numpy as np
import torch

from vllm import SamplingParams

from vllm_omni.diffusion.block_causal import BlockCausalDenoiser, BlockWork
from vllm_omni.diffusion.params import resolve_params
from vllm_omni.kernels import paged_kv
from vllm_omni.models import FAMILIES_BY_NAME
from vllm_omni.models.transformer import KVLayout

from host_bench import one_rank, profiled_runs  # beside this script

PAGE = 32
VOCAB = 64
MASK = VOCAB - 1


class StandIn:
    """What the denoiser asks of a model; each layer runs the plan's
    host-side work (the page writes and arena copies are real; the attention
    kernel is not: on a GPU it is one launch)."""

    logit_shift = 0
    block_starts_with_ar_token = False
    mask_token_id = MASK

    def __init__(self, layers: int, pages: int):
        self.layers = layers
        self.cache = torch.zeros(pages, 1, PAGE, 2 * 8)

    def kv_cache_page_size(self) -> int:
        return PAGE

    def kv_layout(self):
        return KVLayout(num_layers=self.layers, num_kv_heads=1, head_dim=8, dtype=torch.float32)

    def denoise_logits(self, input_ids, positions, plan, rows, shift=True):
        q = torch.zeros(len(input_ids), 1, 8)
        for _ in range(self.layers):  # PlanTensors.attend up to the kernel
            if len(plan.write_rows):
                paged_kv.write_pages(self.cache, (plan.write_pages, plan.write_offsets),
                                     q[plan.write_rows], q[plan.write_rows])
        if rows.numel() == 0:
            return None
        return torch.randn(len(rows), VOCAB)


def works(batch: int, context: int, block: int, steps: int) -> list[BlockWork]:
    sampling = SamplingParams(temperature=0, max_tokens=512, extra_args={
        "block_length": block, "denoising_steps_per_block": steps,
        "algorithm": "low_confidence_static"})
    params = resolve_params(FAMILIES_BY_NAME["sdar"], sampling, {}, PAGE)
    pages_each = -(-(context + block) // PAGE)
    out = []
    for i in range(batch):
        tokens = np.arange(i, i + context, dtype=np.int32) % (VOCAB - 1)
        pages = list(range(1 + i * pages_each, 1 + (i + 1) * pages_each))
        out.append(BlockWork(f"r{i}", tokens, context - block, context, True, params, None,
                             pages))
    return out


def measure(denoiser, args, batch: int) -> dict:
    forwards, elapsed, stats = profiled_runs(
        denoiser, lambda: works(batch, args.context, args.block, args.steps), args.repeat)
    row = {"ms": round(1e3 * elapsed / forwards, 3)}
    for name, functions in PARTS.items():
        cum = sum(v[3] for (path, _, fn), v in stats.items()
                  if fn in functions and path.endswith(("block_causal.py", "block_plan.py",
                                                        "attention_plan.py", "cuda_graphs.py",
                                                        "overhead.py")))
        row[name] = round(1e3 * cum / forwards, 3)
    return row


PARTS = {
    "plan": {"plan"},  # BlockPlans.plan: sequences, AttentionPlan, the stores' ids
    "to_device": {"tensors", "load"},  # eager: plan.tensors; graphs: StaticInputs.load
    "layers": {"denoise_logits"},  # per-layer host work with the plan
    "commit": {"_commit"},
    "look": {"_first_masks"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--context", type=int, default=768, help="tokens before the block")
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per block")
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with one_rank():  # the denoiser asks for the TP size
        pages = 2 + max(args.batch) * -(-(args.context + args.block) // PAGE)
        model = StandIn(args.layers, pages)
        budget = max(args.batch) * 2 * args.block
        for mode in ("eager", "static"):
            denoiser = BlockCausalDenoiser(model, torch.device("cpu"), budget,
                                           max_block_length=PAGE, max_model_len=args.context + 64,
                                           max_num_seqs=max(args.batch))
            if mode == "static":
                denoiser.set_step_graphs(True, capture=False)
            for batch in args.batch:
                print({"mode": mode, "batch": batch, **measure(denoiser, args, batch)}, flush=True)


if __name__ == "__main__":
    main()
