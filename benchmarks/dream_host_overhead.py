"""Host time per denoising step of Dream (the bidirectional denoiser), on the CPU.

What the GPU waits for besides the forward: the commits of every request and
the looks at the device. The model is a stand-in whose forward returns fixed
logits (the mask token never wins), so the times are the denoiser's own:
Python, tensor dispatch and, on a CPU, the commits' arithmetic over a small
vocabulary. Run it against another checkout to compare (``PYTHONPATH``
picks the ``vllm_omni`` it imports):

    PYTHONPATH=. python benchmarks/dream_host_overhead.py --batch 1 32

Each row: one engine step of ``batch`` Dream requests decoding one block of
``--tokens`` positions in ``--steps`` steps. ``--top-k`` is 0 (off) by
default: on a CPU the filter's per-row arithmetic (``torch.topk``) swamps
the dispatch cost this measures; a device commit filters every row of the
block, not only the masked ones, so with ``--top-k 50`` it does about twice
the old commit's arithmetic here (on a GPU that is device time, which runs
behind the host). ``ms``: per denoising step;
``commit``: the commits and looks (cProfile's cumulative time per step);
``forward``: the stand-in forward with the plan; ``ops``: tensor operations
dispatched per step in all (on a GPU each is a kernel launch or a view, the
host's cost there); ``looks``: the denoiser's batched counts of masked
positions per step (``StepStats.looks``; a checkout without that counter
shows None). Waits inside the commits do not show here:
``tests/test_dream_commit.py`` runs the commits on the meta device, where
any would fail.
"""

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from vllm import SamplingParams

from vllm_omni.diffusion.denoiser import Denoiser
from vllm_omni.diffusion.params import resolve_params
from vllm_omni.models import FAMILIES_BY_NAME
from vllm_omni.models.transformer import KVLayout

from host_bench import one_rank, profiled_runs  # beside this script

VOCAB = 16  # small: the arithmetic stays negligible next to dispatching it
MASK = VOCAB - 1
PAGE = 16


class StandIn:
    """What the denoiser asks of a Dream model; the forward returns the
    same logits for every row (cheap, and no row prefers the mask token)."""

    logit_shift = 1
    mask_token_id = MASK

    def __init__(self, rows: int):
        g = torch.Generator().manual_seed(0)
        self.logits = torch.randn(rows, VOCAB, generator=g) * 3
        self.logits[:, MASK] = -1e4

    def kv_cache_page_size(self) -> int:
        return PAGE

    def kv_layout(self):
        return KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32)

    def denoise_logits(self, input_ids, positions, plan, rows, shift=True):
        return self.logits[: len(rows)]


# What one step of each kind of request asks for (extra_args and temperature).
KINDS = {
    "greedy": (0.0, {}),
    "sampled": (0.8, {}),  # seeded: draws from the request's generator
    "alg_temp": (0.0, {"alg_temp": 0.5}),
}


def jobs(denoiser, args, kind: str, batch: int):
    temperature, knobs = KINDS[kind]
    sampling = SamplingParams(temperature=temperature, max_tokens=args.tokens, extra_args={
        "algorithm": args.algorithm, "steps": args.steps, "top_k": args.top_k, **knobs})
    params = resolve_params(FAMILIES_BY_NAME["dream"], sampling)
    out = []
    for i in range(batch):
        prompt = [(i + j) % (VOCAB - 1) for j in range(args.prompt)]
        generator = torch.Generator().manual_seed(i) if temperature > 0 else None
        out.append(denoiser.make_job(f"r{i}", prompt, [], params, generator))
    return out


class OpCount(TorchDispatchMode):
    """Counts the tensor operations dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


COMMIT = {"_commit", "_step", "_count_masks"}  # the old loop: _step per job, the look inline


def measure(denoiser, args, kind: str, batch: int) -> dict:
    steps, elapsed, stats = profiled_runs(denoiser, lambda: jobs(denoiser, args, kind, batch),
                                          args.repeat)

    def cumulative(names):
        # Outermost calls only: _step inside _commit is counted once.
        return sum(v[3] for (path, _, fn), v in stats.items()
                   if fn in names and path.endswith("denoiser.py")
                   and not any(caller[2] in names for caller in v[4]))

    row = {"ms": round(1e3 * elapsed / steps, 3),
           "commit": round(1e3 * cumulative(COMMIT) / steps, 3),
           "forward": round(1e3 * cumulative({"_forward"}) / steps, 3)}
    step_jobs = jobs(denoiser, args, kind, batch)
    before, looks = denoiser.stats.steps, getattr(denoiser.stats, "looks", None)
    with OpCount() as count:  # a pass of its own: counting slows it down
        denoiser.run(step_jobs)
    steps = denoiser.stats.steps - before
    row["ops"] = round(count.ops / steps)
    row["looks"] = None if looks is None else round((denoiser.stats.looks - looks) / steps, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--algorithm", default="maskgit_plus")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=256, help="max_tokens: one block")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=0, help="Dream's top_k knob (0: off)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with one_rank():  # the denoiser asks for the TP size
        rows = max(args.batch) * (args.prompt + args.tokens)
        denoiser = Denoiser(StandIn(rows), torch.device("cpu"), token_budget=rows,
                            max_model_len=args.prompt + args.tokens, max_num_seqs=max(args.batch))
        for kind in args.kinds:
            for batch in args.batch:
                print({"kind": kind, "batch": batch, **measure(denoiser, args, kind, batch)},
                      flush=True)


if __name__ == "__main__":
    main()
