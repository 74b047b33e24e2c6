"""Record golden cases of the official Fast-dLLM v2 decoder on the tiny checkpoint.

    /tmp/fdv2-venv/bin/python tests/fast_dllm_v2/record_golden.py --ref /tmp/fdv2-ref \
        --out tests/fast_dllm_v2/golden/cases.json

Runs in its own environment (transformers 4.53.1, torch 2.13 CPU; see README.md), never the repo's.
--ref holds the official files, unmodified (README.md says where each comes from):
  hub/modeling.py, hub/configuration.py   the checkpoint's trust_remote_code files
                                          (Fast_dLLM_QwenForCausalLM.generate is the decoder)
  v2/generation_functions.py              NVlabs/Fast-dLLM v2/ (batch_sample, the eval harness's decoder)

The tiny checkpoint (tests/fast_dllm_v2/tiny) is copied with the two hub files into a temporary folder
and loaded with AutoModelForCausalLM(trust_remote_code=True), float32, CPU. Every case calls the
official `model.generate(...)` (batch size 1). Nothing in the official code is changed: the trace is
taken by wrapping the model instance's `forward` and `sample_with_top_p` (each wrapper calls the
original and reads the caller's locals). Every case is then re-run
  - in float64 (`model.double()`; the official RMSNorm and RoPE still compute in float32 inside),
  - in "strict" float64 (the same, with RMSNorm and RoPE patched in memory to stay in float64),
  - in float32 through v2/generation_functions.py's `batch_sample` (the eval harness's decoder),
and only cases whose tokens and trace are identical in the three generate runs are written.
"""
import argparse
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
_tmp = tempfile.mkdtemp(prefix="fdv2-golden-")
os.environ.setdefault("HF_HOME", os.path.join(_tmp, "hf"))  # trust_remote_code module cache
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

B = 32  # block size (bd_size); every case uses it, as the checkpoint and all official callers do

GPL = ("The licenses for most software and other practical works are designed to take away your freedom "
       "to share and change the works. By contrast, the GNU General Public License is intended to "
       "guarantee your freedom to share and change all versions of a program, to make sure it remains "
       "free software for all its users.")
APACHE = ("Licensed under the Apache License, Version 2.0 (the License); you may not use this file except "
          "in compliance with the License. You may obtain a copy of the License at")
MIT = "Permission is hereby granted, free of charge, to any person obtaining a copy"

# name, prompt, generation knobs. prompt: text + chat (chat template applied) + optional n_tokens
# (the plain-text ids cut to that many tokens, to hit a given prompt length).
CASES = [
    ("short_thr0.9_sb8", dict(text="The licenses for most software are designed to", chat=False),
     dict(max_new_tokens=64, small_block_size=8, threshold=0.9)),
    ("short_thr1_sb8", dict(text="The licenses for most software are designed to", chat=False),
     dict(max_new_tokens=64, small_block_size=8, threshold=1)),
    ("chat_thr0.9_sb8", dict(text="What does this license allow me to do?", chat=True),
     dict(max_new_tokens=96, small_block_size=8, threshold=0.9)),
    ("chat_thr1_sb8", dict(text="What does this license allow me to do?", chat=True),
     dict(max_new_tokens=96, small_block_size=8, threshold=1)),
    ("p64_thr0.9_sb8", dict(text=GPL, chat=False, n_tokens=64),
     dict(max_new_tokens=64, small_block_size=8, threshold=0.9)),
    ("p64_thr1_sb16", dict(text=GPL, chat=False, n_tokens=64),
     dict(max_new_tokens=64, small_block_size=16, threshold=1)),
    ("p45_thr0.7_sb4", dict(text=GPL, chat=False, n_tokens=45),
     dict(max_new_tokens=96, small_block_size=4, threshold=0.7)),
    ("eos_p20_thr0.95_sb32", dict(text=APACHE, chat=False, n_tokens=20),
     dict(max_new_tokens=64, small_block_size=32, threshold=0.95)),
    ("eos_p19_thr0.9_sb8", dict(text=MIT, chat=False),
     dict(max_new_tokens=128, small_block_size=8, threshold=0.9)),
    ("blockcache_chat_thr0.9_sb8", dict(text="What does this license allow me to do?", chat=True),
     dict(max_new_tokens=96, small_block_size=8, threshold=0.9, use_block_cache=True)),
    ("blockcache_p45_thr1_sb8", dict(text=GPL, chat=False, n_tokens=45),
     dict(max_new_tokens=64, small_block_size=8, threshold=1, use_block_cache=True)),
    ("sample_t0.8_p0.95_thr0.9_sb8", dict(text="What does this license allow me to do?", chat=True),
     dict(max_new_tokens=64, small_block_size=8, threshold=0.9, temperature=0.8, top_p=0.95, seed=7)),
]
DEFAULTS = dict(use_block_cache=False, temperature=0.0, top_p=0.95, seed=None)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def load(ref, tiny):
    ck = os.path.join(_tmp, "ckpt")
    os.makedirs(ck, exist_ok=True)
    for f in os.listdir(tiny):
        shutil.copy(os.path.join(tiny, f), ck)
    for f in ("modeling.py", "configuration.py"):
        shutil.copy(os.path.join(ref, "hub", f), ck)
    model = AutoModelForCausalLM.from_pretrained(ck, trust_remote_code=True, torch_dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    sys.path.insert(0, os.path.join(ref, "v2"))
    import generation_functions  # noqa: E402  (official, unmodified)
    return model, tok, generation_functions


class Recorder:
    """Wraps the instance's forward and sample_with_top_p; the official loop is untouched."""

    def __init__(self, model):
        self.model = model
        self.events = []
        self._fwd = model.forward
        self._sample = model.sample_with_top_p

    def __enter__(self):
        self.model.forward = self.forward
        self.model.sample_with_top_p = self.sample
        return self

    def __exit__(self, *exc):
        del self.model.forward
        del self.model.sample_with_top_p

    def forward(self, *args, **kw):
        caller = inspect.currentframe().f_back.f_locals
        out = self._fwd(*args, **kw)
        ids = kw.get("input_ids", args[0] if args else None)
        pkv = kw.get("past_key_values")
        ev = dict(kind="fwd", n_in=int(ids.shape[1]), cache=int(pkv.get_seq_length()) if pkv is not None else 0,
                  update=bool(kw.get("update_past_key_values", False)))
        if ev["update"]:
            last = out.logits[0, -1].double()
            top2 = torch.topk(last, 2).values
            ev["ar_token"] = int(last.argmax())
            ev["ar_gap"] = float(top2[0] - top2[1])
            if "x_t" in caller:  # block finished: the appended token sits right after the block
                ev["ar_pos"] = int(caller["x_t"].shape[1])
                ev["ar_kind"] = "block_ar"
            elif ids.shape[1] == caller["input_ids"].shape[1]:  # prefill of a block-aligned prompt:
                ev["ar_pos"] = int(ids.shape[1])                  # its argmax is the first new token
                ev["ar_kind"] = "prefill_ar"
            else:                # prefill of the prompt's full blocks only (logits unused)
                ev["ar_kind"] = "prefill"
        self.events.append(ev)
        return out

    def sample(self, logits, top_p=0.95, temperature=0):
        caller = inspect.currentframe().f_back.f_locals
        x_t = caller["x_t"]
        x_1, p_1t = self._sample(logits, top_p=top_p, temperature=temperature)
        L = x_t.shape[1]
        s0 = L + caller["start"]
        s1 = L if caller["end"] is None else L + caller["end"]
        self.events.append(dict(kind="step", pre=x_t[0].clone(), ref=x_t, lo=s0, hi=s1,
                                block=(L - B) // B, sub_block=int(caller["small_block_idx"]),
                                logits=logits[0].detach().double().clone(),
                                conf=torch.gather(p_1t, -1, x_1.unsqueeze(-1))[0, :, 0].double().clone(),
                                x_1=x_1[0].clone(), threshold=float(caller["threshold"])))
        return x_1, p_1t


def build_trace(events, P, mask_id, greedy):
    steps = [i for i, e in enumerate(events) if e["kind"] == "step"]
    trace, gaps, sel_gaps, thr_dists = [], [], [], []
    for j, i in enumerate(steps):
        e = events[i]
        nxt = events[steps[j + 1]] if j + 1 < len(steps) else None
        post = nxt["pre"] if (nxt is not None and nxt["ref"] is e["ref"]) else e["ref"][0]
        pre = e["pre"]
        newly = ((pre == mask_id) & (post != mask_id)).nonzero().flatten().tolist()
        assert newly and all(e["lo"] <= p < e["hi"] for p in newly), (newly, e["lo"], e["hi"])
        trace.append(dict(kind="denoise", block=e["block"], sub_block=e["sub_block"],
                          unmasked=[[p - P, int(post[p])] for p in newly]))
        masked = [p for p in range(e["lo"], e["hi"]) if pre[p] == mask_id]
        conf = {p: float(e["conf"][p - e["lo"]]) for p in masked}
        for p in newly:
            assert int(post[p]) == int(e["x_1"][p - e["lo"]])
            if greedy:
                top2 = torch.topk(e["logits"][p - e["lo"]], 2).values
                gaps.append(float(top2[0] - top2[1]))
        rest = [p for p in masked if p not in newly]
        if rest:
            sel_gaps.append(min(conf[p] for p in newly) - max(conf[p] for p in rest))
        if e["threshold"] < 1:
            thr_dists.append(min(abs(c - e["threshold"]) for c in conf.values()))
    # AR tokens (prefill of a block-aligned prompt, and the token appended after each finished block)
    ar = [e for e in events if e["kind"] == "fwd" and e["update"] and "ar_pos" in e]
    return trace, ar, gaps, sel_gaps, thr_dists


def interleave(events, trace, P, out_ids):
    """Denoise steps and AR tokens in the order they happened."""
    res, k = [], 0
    for e in events:
        if e["kind"] == "step":
            res.append(trace[k])
            k += 1
        elif e["update"] and "ar_pos" in e and e["ar_pos"] - P < len(out_ids):
            pos = e["ar_pos"] - P
            assert out_ids[pos] == e["ar_token"], (pos, out_ids[pos], e["ar_token"])
            res.append(dict(kind=e["ar_kind"], block=e["ar_pos"] // B, sub_block=None,
                            unmasked=[[pos, e["ar_token"]]]))
    return res


def run_generate(model, prompt_ids, knobs, mask_id, stop_id):
    if knobs["seed"] is not None:
        torch.manual_seed(knobs["seed"])
    inp = torch.tensor([prompt_ids])
    with Recorder(model) as rec:
        out = model.generate(inp, max_new_tokens=knobs["max_new_tokens"], mask_id=mask_id,
                             threshold=knobs["threshold"], small_block_size=knobs["small_block_size"],
                             block_size=B, stop_token=stop_id, top_p=knobs["top_p"],
                             temperature=knobs["temperature"], use_block_cache=knobs["use_block_cache"])
    return out[0, len(prompt_ids):].tolist(), rec.events


def run_batch_sample(gf, model, tok, prompt_ids, knobs, mask_id, stop_id):
    if knobs["seed"] is not None:
        torch.manual_seed(knobs["seed"])
    P = len(prompt_ids)
    res = gf.Fast_dLLM_QwenForCausalLM.batch_sample(
        model, torch.tensor([prompt_ids]), tok, block_size=B, max_new_tokens=knobs["max_new_tokens"],
        small_block_size=knobs["small_block_size"], min_len=P, seq_len=torch.tensor([P]),
        mask_id=mask_id, threshold=knobs["threshold"], stop_token=stop_id,
        use_block_cache=knobs["use_block_cache"], top_p=knobs["top_p"], temperature=knobs["temperature"])
    return res[0][P:].tolist()


class StrictFloat64:
    """Patch (in memory) the official RMSNorm and RoPE to compute in the model's dtype."""

    def __init__(self, model):
        self.mod = sys.modules[type(model).__module__]
        self.cfg = model.config

    def __enter__(self):
        N, R = self.mod.Fast_dLLM_QwenRMSNorm, self.mod.Fast_dLLM_QwenRotaryEmbedding
        self.saved = (N.forward, R.forward)
        cfg = self.cfg
        hd = cfg.hidden_size // cfg.num_attention_heads

        def norm_forward(self, h):
            var = h.pow(2).mean(-1, keepdim=True)
            return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))

        def rope_forward(self, x, position_ids):
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            freqs = position_ids[0].to(torch.float64)[:, None] * inv[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)[None]
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        N.forward, R.forward = norm_forward, rope_forward
        return self

    def __exit__(self, *exc):
        N, R = self.mod.Fast_dLLM_QwenRMSNorm, self.mod.Fast_dLLM_QwenRotaryEmbedding
        N.forward, R.forward = self.saved


def prompt_ids_for(tok, prompt):
    if prompt["chat"]:
        text = tok.apply_chat_template([{"role": "user", "content": prompt["text"]}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = prompt["text"]
    ids = tok([text])["input_ids"][0]
    if "n_tokens" in prompt:
        assert len(ids) >= prompt["n_tokens"], (len(ids), prompt)
        ids = ids[:prompt["n_tokens"]]
    return ids


def record_case(name, prompt, knobs, model, tok, gf, mask_id, stop_id):
    knobs = {**DEFAULTS, **knobs}
    greedy = knobs["temperature"] == 0
    ids = prompt_ids_for(tok, prompt)
    P = len(ids)
    model.float()
    out, events = run_generate(model, ids, knobs, mask_id, stop_id)
    assert mask_id not in out, "the mask id was committed"
    trace, ar, gaps, sel, thr = build_trace(events, P, mask_id, greedy)
    trace = interleave(events, trace, P, out)
    gaps += [e["ar_gap"] for e in ar if e["ar_pos"] - P < len(out)]
    fwd = [e for e in events if e["kind"] == "fwd"]
    forwards = dict(prefill=sum(1 for e in fwd if e.get("ar_kind") in ("prefill", "prefill_ar")),
                    denoise=sum(1 for e in fwd if not e["update"]),
                    block_complete=sum(1 for e in fwd if e.get("ar_kind") == "block_ar"))
    bs_out = run_batch_sample(gf, model, tok, ids, knobs, mask_id, stop_id)

    model.double()
    out64, ev64 = run_generate(model, ids, knobs, mask_id, stop_id)
    tr64 = interleave(ev64, build_trace(ev64, P, mask_id, greedy)[0], P, out64)
    with StrictFloat64(model):
        out64s, ev64s = run_generate(model, ids, knobs, mask_id, stop_id)
    tr64s = interleave(ev64s, build_trace(ev64s, P, mask_id, greedy)[0], P, out64s)
    model.float()

    stop = stop_id in out
    bs_cut = bs_out[:bs_out.index(stop_id) + 1] if stop_id in bs_out else bs_out
    case = dict(
        name=name, function="Fast_dLLM_QwenForCausalLM.generate", prompt_ids=ids,
        prompt=dict(text=prompt["text"], chat=prompt["chat"], **({"n_tokens": prompt["n_tokens"]} if "n_tokens" in prompt else {})),
        prompt_len=P, block_size=B, max_new_tokens=knobs["max_new_tokens"],
        small_block_size=knobs["small_block_size"], threshold=knobs["threshold"],
        use_block_cache=knobs["use_block_cache"], temperature=knobs["temperature"], top_p=knobs["top_p"],
        seed=knobs["seed"], output_ids=out, output_text=tok.decode(out),
        stop_reason="stop_token" if stop else "length", nfe=len(fwd), forwards=forwards, trace=trace,
        min_token_logit_gap=min(gaps) if gaps else None,
        min_selection_gap=min(sel) if sel else None,
        min_threshold_distance=min(thr) if thr else None,
        fp64_same=(out64 == out and tr64 == trace),
        fp64_strict_same=(out64s == out and tr64s == trace),
        batch_sample_same=(bs_cut == out),
    )
    return case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="/tmp/fdv2-ref")
    ap.add_argument("--tiny", default=os.path.join(HERE, "tiny"))
    ap.add_argument("--out", default=os.path.join(HERE, "golden", "cases.json"))
    ap.add_argument("--only", nargs="*", help="record only these case names (and print them)")
    a = ap.parse_args()
    torch.set_num_threads(1)  # one thread: the reduction order does not depend on the machine's cores
    model, tok, gf = load(a.ref, a.tiny)
    mask_id = tok.convert_tokens_to_ids("|<MASK>|")
    stop_id = tok.convert_tokens_to_ids("<|im_end|>")
    cases, dropped = [], []
    for name, prompt, knobs in CASES:
        if a.only and name not in a.only:
            continue
        c = record_case(name, prompt, knobs, model, tok, gf, mask_id, stop_id)
        ok = c["fp64_same"] and c["fp64_strict_same"]
        print(f"{name:32s} P={c['prompt_len']:3d} out={len(c['output_ids']):3d} {c['stop_reason']:10s} "
              f"steps={sum(t['kind'] == 'denoise' for t in c['trace']):3d} nfe={c['nfe']:3d} "
              f"gap={c['min_token_logit_gap']} sel={c['min_selection_gap']} thr={c['min_threshold_distance']} "
              f"fp64={c['fp64_same']} strict={c['fp64_strict_same']} batch_sample={c['batch_sample_same']}"
              + ("" if ok else "  DROPPED"), flush=True)
        (cases if ok else dropped).append(c)
    data = dict(
        model="fast_dllm_v2-tiny (tests/fast_dllm_v2/tiny)",
        mask_token_id=mask_id, stop_token_id=stop_id, pad_token_id=tok.pad_token_id, block_size=B,
        environment=dict(torch=torch.__version__, transformers=transformers.__version__, device="cpu",
                         dtype="float32", threads=1),
        reference=dict(
            modeling_py_sha256=sha256(os.path.join(a.ref, "hub", "modeling.py")),
            configuration_py_sha256=sha256(os.path.join(a.ref, "hub", "configuration.py")),
            generation_functions_py_sha256=sha256(os.path.join(a.ref, "v2", "generation_functions.py"))),
        dropped=[c["name"] for c in dropped],
        cases=cases,
    )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {a.out}: {len(cases)} cases, dropped {[c['name'] for c in dropped]}, "
          f"{os.path.getsize(a.out)} bytes")


if __name__ == "__main__":
    main()
