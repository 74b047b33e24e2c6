"""Where a batch-1 diffusion request's time goes, step by step (torch profiler).

    python benchmarks/profile_denoise.py --model ../shared/models/llada-8b-shape \
        --shapes 128/256 3072/512 --runs dual:1 dual:4 none:4 --trace-dir /tmp/traces

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the
profiler sees the model runner. For each ``mode:k`` run (after one untimed
warm-up request) it prints:
- the request's wall time, and how much of it the denoiser's steps took
  (the rest: vLLM's engine step, scheduling, output processing, our runner);
- per kind of step (``refresh``: a block's first, whole-canvas forward of the
  prefix/dual caches; ``cached``: the block's later steps; ``exact``): count,
  mean interval from one step's start to the next's, and the GPU's busy time
  inside it (kernels, graph replays included). Interval minus busy is where
  the GPU waited on the host. A whole-canvas step (refresh, exact) also shows
  its share of the bf16 peak over its GPU busy time (FLOPs as
  ``throughput.py``'s ``denoise_flops`` counts them);
- the top GPU kernels and the top host-side operators.
Step boundaries come from ``record_function`` ranges this script wraps around
our own ``Denoiser`` methods (not vLLM's); nothing is patched in vLLM.
"""

import argparse
import contextlib
import functools
import gzip
import itertools
import json
import os
import shutil
import time
from collections import defaultdict

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


EVENTS: list = []  # (kind, start event, end event) of every forward, on CUDA


def label_steps() -> None:
    """Wrap Denoiser._forward in a range named after the kind of step, and
    time each forward on the GPU with CUDA events (the profiler's kernels are
    matched to steps by start time, which a GPU running behind the host
    blurs; events recorded on the stream are exact)."""
    import torch

    from vllm_omni.diffusion.denoiser import Denoiser

    forward = Denoiser._forward

    @functools.wraps(forward)
    def labelled(self, jobs):
        kind = ("exact" if jobs[0].params.cache == "none"
                else "refresh" if jobs[0].step == 0 else "cached")
        with torch.profiler.record_function(f"step.{kind}"):
            if not torch.cuda.is_available():
                return forward(self, jobs)
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            out = forward(self, jobs)
            end.record()
            EVENTS.append((kind, start, end))
            return out

    Denoiser._forward = labelled


def event_times(canvas_tflops: float, peak: float) -> None:
    """Per kind of step: the forwards' GPU time from CUDA events."""
    import torch

    if not EVENTS:
        return
    torch.cuda.synchronize()
    per_kind = defaultdict(list)
    for kind, start, end in EVENTS:
        per_kind[kind].append(start.elapsed_time(end))
    for kind, ms in sorted(per_kind.items()):
        mean = sum(ms) / len(ms)
        share = (f", {canvas_tflops / (mean / 1e3) / peak:.1%} of bf16 peak"
                 if kind in ("refresh", "exact") else "")
        print(f"forward GPU time (CUDA events) {kind}: {len(ms)} forwards, mean {mean:.3f} ms, "
              f"min {min(ms):.3f}, max {max(ms):.3f}{share}")
    EVENTS.clear()


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def canvas_tflop(config: dict, length: int, block: int) -> float:
    """TFLOPs of one whole-canvas forward of ``length`` tokens (its logits:
    one block's rows): ``throughput.denoise_flops`` of a one-block request
    decoded in one exact step."""
    from throughput import denoise_flops, model_shape
    return denoise_flops(model_shape(config), length - block, block, block, block, "none") / 1e12


def analyse(prof, wall_s: float) -> None:
    events = prof.events()
    # A record_function range shows twice: on the host and as a GPU annotation.
    steps = sorted((e.time_range.start, e.name[5:]) for e in events
                   if e.name.startswith("step.") and e.device_type.name == "CPU")
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type.name == "CUDA" and not e.name.startswith("step.")
                     and e.time_range.end > e.time_range.start)
    if not steps:
        print("no denoising steps seen")
        return
    # Step i spans from its start to the next step's start; the last one to
    # the last kernel. Blocks are separated by an engine step: count the gap
    # before a refresh apart when it is much longer than a step.
    bounds = [s for s, _ in steps] + [kernels[-1][1] if kernels else steps[-1][0]]
    per_kind = defaultdict(lambda: [0, 0.0, 0.0])
    j = 0
    for i, (start, kind) in enumerate(steps):
        end = bounds[i + 1]
        inside = []
        while j < len(kernels) and kernels[j][0] < end:
            if kernels[j][0] >= start:
                inside.append((kernels[j][0], min(kernels[j][1], end)))
            j += 1
        acc = per_kind[kind]
        acc[0] += 1
        acc[1] += end - start
        acc[2] += busy_us(inside)
    span = (bounds[-1] - bounds[0]) / 1e6
    print(f"request wall {wall_s * 1e3:.1f} ms; from first step to last kernel {span * 1e3:.1f} ms")
    print(f"{'step':<9}{'count':>6}{'interval ms':>13}{'GPU busy ms':>13}{'GPU idle ms':>13}")
    for kind, (n, interval, busy) in sorted(per_kind.items()):
        print(f"{kind:<9}{n:>6}{interval / n / 1e3:>13.3f}{busy / n / 1e3:>13.3f}"
              f"{(interval - busy) / n / 1e3:>13.3f}")
    gaps = [steps[i + 1][0] - steps[i][0] for i in range(len(steps) - 1)
            if steps[i + 1][1] == "refresh"]
    if gaps:
        print(f"interval ending in a block change (engine step between blocks): "
              f"mean {sum(gaps) / len(gaps) / 1e3:.3f} ms over {len(gaps)}")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=15))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--runs", nargs="+", default=["dual:1", "dual:4", "none:4"],
                    help="mode:k pairs (mode: none, prefix, dual)")
    ap.add_argument("--shapes", nargs="+", default=["128/256"],
                    help="prompt/gen pairs, each profiled with every run")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--trace-dir", help="write a gzipped Chrome trace per run here")
    args = ap.parse_args()

    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    from vllm_omni.worker import WORKER_CLS

    label_steps()
    shapes = [tuple(map(int, s.split("/"))) for s in args.shapes]
    canvas = lambda gen: -(-gen // args.block) * args.block
    llm = LLM(model=args.model, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
              max_model_len=max(p + canvas(g) for p, g in shapes) + 64, seed=0,
              enforce_eager=args.eager,
              worker_cls=WORKER_CLS,
              gpu_memory_utilization=args.gpu_memory_utilization)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    config = json.loads(open(os.path.join(args.model, "config.json")).read())
    for (length, gen), run in itertools.product(shapes, args.runs):
        prompt = {"prompt_token_ids":
                  np.random.default_rng(0).integers(100, vocab - 1000, length).tolist()}
        mode, k = run.split(":")
        sp = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True, extra_args={
            "block_length": args.block, "steps": canvas(gen) // int(k), "cache": mode})
        tflop = canvas_tflop(config, length + canvas(gen), args.block)
        # A warm-up (compiles, graph captures), then one run timed by CUDA
        # events alone, then one under the profiler (which slows the host).
        for profiled in (None, False, True):
            llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
            EVENTS.clear()
            with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                     torch.profiler.ProfilerActivity.CUDA])
                  if profiled else contextlib.nullcontext()) as prof:
                t = time.perf_counter()
                llm.generate([prompt], sp, use_tqdm=False)
                wall = time.perf_counter() - t
            if profiled is None:
                continue
            stats = llm.collective_rpc("diffusion_step_stats")[0]
            print(f"\n===== prompt {length} gen {gen}, {mode} k={k}"
                  f"{' (under the profiler)' if profiled else ''}: {gen / wall:.1f} tok/s; "
                  f"denoiser steps {stats['steps']} ({stats['graph_steps']} graphed), their "
                  f"wall {stats['wall_s'] * 1e3:.1f} ms of {wall * 1e3:.1f} ms")
            event_times(tflop, args.peak_tflops)
        analyse(prof, wall)
        if args.trace_dir:
            os.makedirs(args.trace_dir, exist_ok=True)
            path = os.path.join(args.trace_dir, f"p{length}_g{gen}_{mode}_k{k}.json")
            prof.export_chrome_trace(path)
            with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
                shutil.copyfileobj(f, g)
            os.unlink(path)


if __name__ == "__main__":
    main()
