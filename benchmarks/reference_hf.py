"""Time the official LLaDA / Dream / Fast-dLLM generation code at batch 1 (random weights, real shapes).

The reference code is never copied into this repo: `--ref-code` is an ignored checkout (`.refcode/`,
commits in its REVISIONS) of ML-GSAI/LLaDA `generate.py` (as LLaDA/) and NVlabs/Fast-dLLM
`llada/{generate.py,model/}`, `dream/model/` (as Fast-dLLM/). It needs transformers 4.46.x
(5.x breaks it), so it always runs in a process of its own. `../shared` does not travel to the GPU
machine, so .refcode/models/ holds copies of the shape configs: run with carry [".refcode"] (14 MB):

    python3 -m pip install -q --no-deps --no-index --target "$HOME/.cache/ref-site" .refcode/wheels/*.whl
    PYTHONPATH=$HOME/.cache/ref-site python3 benchmarks/reference_hf.py --ref-code .refcode \
        --model .refcode/models/llada-8b-shape --prompt 128 --gen 256 --block 32 \
        --tokens-per-step 1 2 4 --dtype bfloat16 --device cuda --json $OUT/llada_ref.json
    # and --model .refcode/models/dream-7b-shape --json $OUT/dream_ref.json

The script puts Fast-dLLM/llada or Fast-dLLM/dream on sys.path itself (both ship a package named
`model`: one model family per process). Each run: batch 1, temperature 0, steps = gen // k,
one warm-up then one timed run (synchronized), tok/s = gen / seconds, nfe = model forwards.

LLaDA (model: Fast-dLLM llada/model LLaDAModelLM = the HF LLaDA model plus KV-cache hooks):
  llada/generate         ML-GSAI generate(model, prompt, steps=, gen_length=, block_length=,
                         temperature=0., remasking='low_confidence', mask_id=)
  fastdllm/generate      Fast-dLLM llada/generate.py generate(same) (float64 softmax, returns (x, nfe))
  fastdllm/prefix_cache  generate_with_prefix_cache(same)
  fastdllm/dual_cache    generate_with_dual_cache(same)
Dream (model: Fast-dLLM dream/model DreamModel):
  dream/diffusion_generate  generation_utils.py diffusion_generate(prompt, max_new_tokens=gen, steps=,
                         temperature=0., top_p=None, top_k=None, alg='entropy', alg_temp=0.): the whole
                         canvas is one block (Fast-dLLM's copy of Dream's code; it matches dream_cases.json)
  fastdllm/prefix_cache  generation_utils_block.py diffusion_generate(same, block_length=block, dual_cache=False)
  fastdllm/dual_cache    same, dual_cache=True (its `_sample` always uses entropy, hence alg='entropy')

Fidelity check on the golden tiny models (CPU, float32), e.g.
    ... --model ../shared/golden/llada-tiny --weights ../shared/golden/llada-tiny/model.safetensors \
        --check ../shared/golden/llada_cases.json --device cpu --dtype float32
"""
import argparse, contextlib, importlib.util, io, json, sys, time, types
from pathlib import Path

import torch
from torch import nn


def load_module(name, path):
    # Both repos ship a top-level `generate.py`: load each one from its file under its own name.
    spec = importlib.util.spec_from_file_location(name, path)
    spec.loader.exec_module(mod := importlib.util.module_from_spec(spec))
    return mod


@contextlib.contextmanager
def params_on_meta():
    # LLaDAModelLM forces init_device="cpu" and DreamModel runs _init_weights in post_init, so a
    # plain construction allocates and initialises 8B fp32 weights on the CPU (minutes). Moving
    # every parameter to `meta` as it is registered makes that free; buffers (RoPE) stay real.
    orig = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def materialize(model, device, dtype):
    # Random weights straight on the device: matrices N(0, 0.02), norm weights 1, biases 0.
    # Values do not change the timings: with a fixed tokens-per-step every block takes the same steps.
    gen = torch.Generator(device=device).manual_seed(0)
    made = {}  # shared (tied) parameters stay shared
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                t = torch.empty(p.shape, device=device, dtype=dtype)
                t.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else t.fill_(0.0 if name == "bias" else 1.0)
                made[id(p)] = nn.Parameter(t, requires_grad=False)
            mod._parameters[name] = made[id(p)]
    return model.to(device)  # the buffers (Dream's inv_freq, fp32 as in from_pretrained)


def build(ref, cfg_dir, device, dtype, weights):
    cfg = json.loads((cfg_dir / "config.json").read_text())
    llada = cfg["model_type"] == "llada"
    sys.path.insert(0, str(ref / "Fast-dLLM" / ("llada" if llada else "dream")))
    if llada:
        from model.configuration_llada import LLaDAConfig
        from model.modeling_llada import LLaDAModelLM
        with params_on_meta():
            model = LLaDAModelLM(LLaDAConfig.from_pretrained(cfg_dir), init_params=False)
    else:
        from model.configuration_dream import DreamConfig
        from model.modeling_dream import DreamModel
        with params_on_meta():
            model = DreamModel(DreamConfig.from_pretrained(cfg_dir))
    model = materialize(model, device, dtype)
    if weights:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(weights), strict=True)
    return model.eval(), llada, cfg["mask_token_id"]


def runners(ref, llada, mask_id):
    """name -> run(model, prompt, gen, steps, block, **extra) returning the canvas [1, prompt + gen]."""
    if llada:
        ml = load_module("llada_generate", ref / "LLaDA" / "generate.py")
        fd = load_module("fastdllm_llada_generate", ref / "Fast-dLLM" / "llada" / "generate.py")

        def wrap(fn, returns_nfe):
            def run(m, p, gen, steps, block, **kw):
                kw = dict(dict(temperature=0.0, remasking="low_confidence", mask_id=mask_id), **kw)
                out = fn(m, p, steps=steps, gen_length=gen, block_length=block, **kw)
                return out[0] if returns_nfe else out
            return run
        return {"llada/generate": wrap(ml.generate, False),
                "fastdllm/generate": wrap(fd.generate, True),
                "fastdllm/prefix_cache": wrap(fd.generate_with_prefix_cache, True),
                "fastdllm/dual_cache": wrap(fd.generate_with_dual_cache, True)}

    import model.generation_utils as gu
    import model.generation_utils_block as gb

    def wrap(mixin, dual_cache=None):
        def run(m, p, gen, steps, block, **kw):
            # Bound on the instance, as Fast-dLLM's dream/eval.py does (diffusion_generate calls self._sample).
            m.diffusion_generate = types.MethodType(mixin.diffusion_generate, m)
            m._sample = types.MethodType(mixin._sample, m)
            kw = dict(dict(temperature=0.0, top_p=None, top_k=None, alg="entropy", alg_temp=0.0), **kw)
            if dual_cache is not None:  # only the Fast-dLLM code has blocks
                kw.update(block_length=block, dual_cache=dual_cache)
            with contextlib.redirect_stdout(io.StringIO()):  # generation_utils prints 'used time' per call
                return m.diffusion_generate(p, max_new_tokens=gen, steps=steps, **kw)
        return run
    return {"dream/diffusion_generate": wrap(gu.DreamGenerationMixin),
            "fastdllm/prefix_cache": wrap(gb.DreamGenerationMixin, dual_cache=False),
            "fastdllm/dual_cache": wrap(gb.DreamGenerationMixin, dual_cache=True)}


def check(model, impls, llada, cases_path, device):
    """Run every golden case through the matching reference function; report exact matches."""
    data, ok_all = json.loads(Path(cases_path).read_text()), True
    for c in data["cases"]:
        p = torch.tensor([c["prompt_ids"]], device=device)
        if llada:
            names = {"exact": ["fastdllm/generate"] + (["llada/generate"] if c["threshold"] is None else []),
                     "prefix_cache": ["fastdllm/prefix_cache"], "dual_cache": ["fastdllm/dual_cache"]}[c["mode"]]
            extra = dict(remasking=c["remasking"])
            gen, block = c["gen_length"], c["block_length"]
        else:
            names = ["dream/diffusion_generate"]
            extra = dict(alg=c["alg"], top_k=c["top_k"], top_p=c["top_p"], eps=c["eps"])
            gen = block = c["max_new_tokens"]
        for name in names:
            kw = dict(extra, threshold=c["threshold"]) if name.startswith("fastdllm") else extra
            got = impls[name](model, p, gen, c["steps"], block, **kw)[0, p.shape[1]:].tolist()
            ok_all &= (ok := got == c["output_ids"])
            print(f"{'MATCH' if ok else 'DIFF '} {c['name']:28s} {name}")
    print("all cases match" if ok_all else "SOME CASES DIFFER")
    return ok_all


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-code", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True, help="dir with config.json (LLaDA or Dream)")
    ap.add_argument("--weights", help="safetensors to load instead of random weights (tiny golden models)")
    ap.add_argument("--check", help="golden cases json: verify exact outputs instead of timing")
    for flag, default in (("--prompt", 128), ("--gen", 256), ("--block", 32)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--tokens-per-step", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--impls", nargs="+", help="subset of implementations (default: all for the model)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="write result rows here")
    args = ap.parse_args()
    ref, device, dtype = args.ref_code.resolve(), torch.device(args.device), getattr(torch, args.dtype)

    t0 = time.perf_counter()
    model, llada, mask_id = build(ref, args.model.resolve(), device, dtype, args.weights)
    impls = runners(ref, llada, mask_id)
    print(f"built {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, "
          f"{args.dtype}, {device}) in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.check:
        sys.exit(0 if check(model, impls, llada, args.check, device) else 1)

    nfe = [0]  # counts top-level forwards (both models call their inner model directly)
    model.register_forward_pre_hook(lambda *_: nfe.__setitem__(0, nfe[0] + 1))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Random prompt ids (seed 0) away from the special tokens at both ends of the vocabulary.
    prompt = torch.randint(100, model.config.vocab_size - 1000, (1, args.prompt),
                           generator=torch.Generator().manual_seed(0))
    prompt[prompt == mask_id] = 100
    prompt = prompt.to(device)

    rows = []
    print(f"{'impl':26s} {'k':>2s} {'steps':>5s} {'nfe':>5s} {'seconds':>8s} {'tok/s':>8s}")
    for name in args.impls or impls:
        for k in args.tokens_per_step:
            steps = args.gen // k
            run = lambda: impls[name](model, prompt, args.gen, steps, args.block)
            run()  # warm-up (CUDA context, kernels, allocator)
            sync()
            nfe[0], t = 0, time.perf_counter()
            out = run()
            sync()
            dt = time.perf_counter() - t
            assert out.shape == (1, args.prompt + args.gen) and not (out == mask_id).any(), "canvas not filled"
            rows.append(dict(impl=name, model=args.model.name, k=k, steps=steps, nfe=nfe[0],
                             seconds=round(dt, 4), tok_per_s=round(args.gen / dt, 2)))
            print(f"{name:26s} {k:2d} {steps:5d} {nfe[0]:5d} {dt:8.3f} {args.gen / dt:8.1f}", flush=True)
            if args.json:  # after every row, so a later crash or timeout keeps what was measured
                Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
