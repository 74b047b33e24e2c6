"""Record golden outputs of JetAstra/SDAR's official `block_diffusion_generate` on tests/sdar/tiny.

    python tests/sdar/record_golden.py --ref /tmp/sdar-ref
    # writes tests/sdar/golden/sdar_cases.json and tests/sdar/golden/sdar_forward.safetensors

Runs the official function (generate.py, unmodified, called directly) on the tiny checkpoint, float32 on
CPU, one case at a time with `torch.manual_seed(seed)` first. The run is observed, not changed:
- a forward hook on the model records every call (input ids, store_kv, logits);
- `torch.multinomial` is wrapped (the real one still draws, once per call, same RNG stream) to record
  the processed distribution and the sampled tokens; the wrapper also checks, on a saved copy of the RNG
  state, that the sample equals argmax(probs / Exp(1) draws) (SDAR-NOTES quirk 4).
From these the script re-derives each step independently (SDAR-NOTES' description of sampling, the
schedule and the three strategies) and asserts that it gives the official result, then writes the
per-step trace and decision margins. Cases that would hit the notes' tie quirk (k > masks left in a
top-k selection) or whose top-k selection cuts through tied confidences (e.g. several positions at
probability 1.0 after top-p) are refused, and so are cases whose decision margins fall under
MIN_LOGIT_MARGIN / MIN_PROB_MARGIN. Every case is then re-run with the model in float64 (RoPE stays
float32) and kept only if its tokens are identical.
"""
import argparse
import copy
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _reference import load_reference  # noqa: E402

TEXTS = {
    "gpl": "The licenses for most software are designed to take away your freedom to share and change it. "
           "By contrast, the GNU General Public License is intended to guarantee your freedom to share and "
           "change free software.",
    "mit": "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
           "associated documentation files, to deal in the Software without restriction.",
    "apache": "Licensed under the Apache License, Version 2.0; you may not use this file except in compliance "
              "with the License. You may obtain a copy of the License at",
    "bsd": "Redistribution and use in source and binary forms, with or without modification, are permitted "
           "provided that the following conditions are met.",
}
CHAT = [{"role": "user", "content": "What is free software?"}]
GREEDY = dict(temperature=1.0, top_k=1, top_p=1.0)  # the official greedy (eval configs)
STOP = "eos"  # stopping_criteria_idx = generation_config.eos_token_id (the CLI's default)

# name, prompt (text key or "chat"), prompt length (tokens, truncating the text; None = whole),
# gen_length, block_length, denoising_steps, strategy, threshold, sampling, seed, stop
CASES = [
    dict(name="seq_b4_s4_greedy_p8", text="gpl", P=8, gen=22, B=4, S=4, strategy="sequential",
         sampling=GREEDY, seed=0, stop=None),
    dict(name="seq_b4_s2_greedy_p11_stop", text="bsd", P=11, gen=22, B=4, S=2, strategy="sequential",
         sampling=GREEDY, seed=0, stop=STOP),
    dict(name="seq_b8_s3_sample_p12", text="apache", P=12, gen=28, B=8, S=3, strategy="sequential",
         sampling=dict(temperature=0.9, top_k=0, top_p=0.9), seed=72, stop=None),
    dict(name="dyn_b8_s8_greedy_p5", text="bsd", P=5, gen=20, B=8, S=8, strategy="low_confidence_dynamic",
         threshold=0.9, sampling=GREEDY, seed=0, stop=None),
    dict(name="dyn_b4_s4_greedy_chat_stop", text="chat", P=None, gen=24, B=4, S=4,
         strategy="low_confidence_dynamic", threshold=0.85, sampling=GREEDY, seed=0, stop=STOP),
    dict(name="static_b4_s4_sample_p4", text="gpl", P=4, gen=20, B=4, S=4, strategy="low_confidence_static",
         sampling=dict(temperature=1.0, top_k=0, top_p=1.0), seed=11, stop=None),
    dict(name="static_b8_s4_sample_p16", text="gpl", P=16, gen=24, B=8, S=4, strategy="low_confidence_static",
         sampling=dict(temperature=0.8, top_k=50, top_p=1.0), seed=39, stop=None),
    dict(name="static_b8_s8_sample_p11", text="mit", P=11, gen=21, B=8, S=8, strategy="low_confidence_static",
         sampling=dict(temperature=0.7, top_k=0, top_p=0.95), seed=75, stop=None),
    dict(name="dyn_b8_s8_sample_p9", text="apache", P=9, gen=18, B=8, S=8, strategy="low_confidence_dynamic",
         threshold=0.5, sampling=dict(temperature=0.7, top_k=10, top_p=1.0), seed=33, stop=None),
    dict(name="dyn_b4_s2_sample_p8", text="bsd", P=8, gen=24, B=4, S=2, strategy="low_confidence_dynamic",
         threshold=0.6, sampling=dict(temperature=0.8, top_k=5, top_p=1.0), seed=58, stop=None),
    dict(name="static_b16_s8_sample_p6", text="mit", P=6, gen=30, B=16, S=8, strategy="low_confidence_static",
         sampling=dict(temperature=0.9, top_k=20, top_p=0.9), seed=72, stop=None),
    dict(name="dyn_b16_s16_sample_p16", text="apache", P=16, gen=32, B=16, S=16,
         strategy="low_confidence_dynamic", threshold=0.7,
         sampling=dict(temperature=0.8, top_k=8, top_p=1.0), seed=23, stop=None),
    dict(name="static_b4_s2_sample_stop", text="gpl", P=6, gen=30, B=4, S=2, strategy="low_confidence_static",
         sampling=dict(temperature=1.0, top_k=0, top_p=1.0), seed=42, stop=STOP),
]


# Decision margins every kept case must clear (fp32 vs fp64 logits differ by ~2e-5 on this model):
# logit-scale gaps (top-1 vs top-2 logit for greedy, log(p/q) of the sample, top-k cut-off) and
# probability-scale ones (selection cut, threshold, top-p cut-off).
MIN_LOGIT_MARGIN = 1e-3
MIN_PROB_MARGIN = 1e-4
LOGIT_MARGINS = ("min_token_logit_gap", "min_sample_log_gap", "min_topk_boundary_gap")
PROB_MARGINS = ("min_selection_gap", "min_threshold_distance", "min_topp_boundary_distance")


class Observer:
    """Forward hook + torch.multinomial wrapper; changes nothing in what the official code computes."""

    def __init__(self, model):
        self.calls, self.samples = [], []
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)
        self._real = torch.multinomial
        torch.multinomial = self._multinomial

    def _hook(self, module, args, kwargs, out):
        ids = args[0] if args else kwargs["input_ids"]
        self.calls.append(dict(ids=ids[0].clone(), store_kv=bool(kwargs.get("store_kv", False)),
                               pos=kwargs["position_ids"][0].clone(), logits=out.logits[0].detach().clone()))

    def _multinomial(self, probs, num_samples, *a, **k):
        state = torch.get_rng_state()
        q = torch.empty_like(probs).exponential_()
        torch.set_rng_state(state)
        tok = self._real(probs, num_samples, *a, **k)
        self.samples.append(dict(probs=probs.detach().clone(), tok=tok[:, 0].clone(), q=q))
        return tok

    def close(self):
        torch.multinomial = self._real
        self.handle.remove()


def process_logits(logits, temperature, top_k, top_p):
    """SDAR-NOTES §5, written independently of generate.py (used to check the recorded distribution)."""
    lg = logits.clone()
    if temperature != 1.0:
        lg = lg / temperature
    if top_k > 0:
        kth = torch.topk(lg, top_k, dim=-1).values[..., -1:]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    if top_p < 1.0:
        sl, si = torch.sort(lg, dim=-1, descending=True)
        cum = torch.softmax(sl, -1).cumsum(-1)
        rm = cum > top_p
        rm[..., 1:] = rm[..., :-1].clone()
        rm[..., 0] = False
        lg = lg.masked_fill(torch.zeros_like(rm).scatter(-1, si, rm), float("-inf"))
    return torch.softmax(lg, -1)


def schedule(B, S):
    return [B // S + (1 if i < B % S else 0) for i in range(S)]


def build_prompt(tok, case):
    if case["text"] == "chat":
        text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return ids, dict(text=CHAT[0]["content"], chat=True)
    ids = tok(TEXTS[case["text"]], add_special_tokens=False)["input_ids"][: case["P"]]
    assert len(ids) == case["P"]
    return ids, dict(text=tok.decode(ids), chat=False)


def run_case(gen, model, tok, mask_id, stop_ids, case, prompt_ids):
    """Run the official sampler once; re-derive and check every step. Returns (record, quirk_hit)."""
    B, S, P, s = case["B"], case["S"], len(prompt_ids), case["sampling"]
    thr = case.get("threshold")
    stops = stop_ids if case["stop"] == STOP else None
    torch.manual_seed(case["seed"] if case["seed"] is not None else 0)
    obs = Observer(model)
    try:
        out = gen.block_diffusion_generate(
            model, prompt={"input_ids": torch.tensor([prompt_ids])}, mask_id=mask_id,
            gen_length=case["gen"], block_length=B, denoising_steps=S,
            temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
            remasking_strategy=case["strategy"],
            confidence_threshold=thr if thr is not None else 0.85,  # the official default, unused
            stopping_criteria_idx=stops)
    finally:
        obs.close()
    out = out[0].tolist()

    # ---- independent re-derivation -------------------------------------------------------------
    nb = (P + case["gen"] + B - 1) // B
    total = nb * B
    sched = schedule(B, S)
    x = list(prompt_ids) + [mask_id] * (total - P)
    ci = si = 0
    nfe = dict(prefill=0, denoise=0, store=0)
    if P // B > 0:
        c = obs.calls[0]
        assert c["store_kv"] and c["ids"].tolist() == x[: (P // B) * B]
        ci, nfe["prefill"] = 1, 1
    trace, quirk = [], False
    m = dict(logit_gap=math.inf, sample_gap=math.inf, selection_gap=math.inf, threshold_distance=math.inf,
             topk_boundary_gap=math.inf, topp_boundary_distance=math.inf)
    rng_checks = rng_ok = 0
    stopped = False
    for b in range(P // B, nb):
        cur = torch.tensor(x[b * B:(b + 1) * B])
        for step in range(S + 1):
            c = obs.calls[ci]
            ci += 1
            assert c["ids"].tolist() == cur.tolist() and c["pos"].tolist() == list(range(b * B, (b + 1) * B))
            masks = cur == mask_id
            if not masks.any():
                assert c["store_kv"]
                nfe["store"] += 1
                break
            assert not c["store_kv"]
            nfe["denoise"] += 1
            smp = obs.samples[si]
            si += 1
            logits = c["logits"]
            probs = process_logits(logits, s["temperature"], s["top_k"], s["top_p"])
            assert torch.equal(probs, smp["probs"]), "processed distribution differs from the notes"
            x0 = smp["tok"]
            alt = (smp["probs"] / smp["q"]).argmax(-1)
            rng_checks += 1
            rng_ok += int(torch.equal(alt, x0))
            x0_p = smp["probs"].gather(-1, x0[:, None])[:, 0]
            k = sched[step]
            nmask = int(masks.sum())
            conf = torch.where(masks, x0_p, torch.tensor(float("-inf"), dtype=x0_p.dtype))
            sel = torch.zeros(B, dtype=torch.bool)
            used_topk = False
            if case["strategy"] == "sequential":
                first = int(masks.nonzero()[0, 0])
                sel[first:first + k] = True
            elif case["strategy"] == "low_confidence_static":
                used_topk = True
            else:
                high = conf > thr
                if int(high.sum()) >= k:
                    sel = high
                else:
                    used_topk = True
                fin = conf[masks]
                m["threshold_distance"] = min(m["threshold_distance"], float((fin - thr).abs().min()))
            if used_topk:
                if k > nmask:
                    quirk = True
                sel[torch.topk(conf, k).indices] = True
                if k < nmask:
                    chosen, rest = conf[sel & masks], conf[~sel & masks]
                    m["selection_gap"] = min(m["selection_gap"], float(chosen.min() - rest.max()))
                    if chosen.min() == rest.max():
                        quirk = True  # tied confidences across the cut: torch.topk's tie-breaking decides
            if (sel & ~masks).any():
                quirk = True
            committed = sel & masks
            # decision margins over the positions that matter (masked ones)
            mp = masks.nonzero()[:, 0]
            if s["top_k"] == 1:
                top2 = torch.topk(logits[committed], 2, dim=-1).values
                m["logit_gap"] = min(m["logit_gap"], float((top2[:, 0] - top2[:, 1]).min()))
            else:
                r = torch.log(smp["probs"][committed]) - torch.log(smp["q"][committed])
                top2 = torch.topk(r, 2, dim=-1).values
                m["sample_gap"] = min(m["sample_gap"], float((top2[:, 0] - top2[:, 1]).min()))
            # top-k / top-p cut-offs: at every masked position (its confidence takes part in the
            # selection), or only at the committed ones for `sequential` (confidence unused)
            mp = committed.nonzero()[:, 0] if case["strategy"] == "sequential" else mp
            lg = logits[mp] / s["temperature"] if s["temperature"] != 1.0 else logits[mp]
            if s["top_k"] > 1:
                tv = torch.topk(lg, s["top_k"] + 1, dim=-1).values
                m["topk_boundary_gap"] = min(m["topk_boundary_gap"], float((tv[:, -2] - tv[:, -1]).min()))
            if s["top_p"] < 1.0:
                if s["top_k"] > 0:
                    kth = torch.topk(lg, s["top_k"], dim=-1).values[:, -1:]
                    lg = lg.masked_fill(lg < kth, float("-inf"))
                cum = torch.softmax(torch.sort(lg, -1, descending=True).values, -1).cumsum(-1)
                m["topp_boundary_distance"] = min(m["topp_boundary_distance"],
                                                  float((cum - s["top_p"]).abs().min()))
            new = cur.clone()
            new[sel] = x0[sel]
            trace.append(dict(block=b, step=step, k=k, masked_before=nmask,
                              committed=[[b * B + int(i) - P, int(new[i])] for i in committed.nonzero()[:, 0]]))
            cur = new
        else:
            raise AssertionError("block not finished after S+1 calls (quirk 7)")
        x[b * B:(b + 1) * B] = cur.tolist()
        if stops is not None and any(t in stops for t in x[P:]):
            stopped = b < nb - 1
            break
    assert ci == len(obs.calls) and si == len(obs.samples), "unexpected extra forwards/samples"
    assert x == out, "re-derivation differs from the official output"
    gen_ids = out[P:]
    first_stop = next((i for i, t in enumerate(gen_ids) if stops and t in stops), None)
    rec = dict(
        name=case["name"], prompt_ids=list(prompt_ids), prompt_length=P,
        gen_length=case["gen"], block_length=B, denoising_steps=S, remasking_strategy=case["strategy"],
        confidence_threshold=thr, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
        seed=case["seed"], stopping_criteria_idx=stops, num_transfer_tokens=sched,
        num_blocks=nb, total_length=total, prefill_length=(P // B) * B,
        output_ids=out, generated_ids=gen_ids, stopped_early=stopped, first_stop_index=first_stop,
        output_text=tok.decode([t for t in gen_ids if t != mask_id]),
        nfe=sum(nfe.values()), nfe_breakdown=nfe, trace=trace,
        min_token_logit_gap=None if m["logit_gap"] == math.inf else m["logit_gap"],
        min_sample_log_gap=None if m["sample_gap"] == math.inf else m["sample_gap"],
        min_selection_gap=None if m["selection_gap"] == math.inf else m["selection_gap"],
        min_threshold_distance=None if m["threshold_distance"] == math.inf else m["threshold_distance"],
        min_topk_boundary_gap=None if m["topk_boundary_gap"] == math.inf else m["topk_boundary_gap"],
        min_topp_boundary_distance=(None if m["topp_boundary_distance"] == math.inf
                                    else m["topp_boundary_distance"]),
    )
    return rec, quirk, (rng_checks, rng_ok)


def write_forward(model, tok, mask_id, path, B=4):
    """One uncached forward of the official model for porting layer by layer: 10 prompt tokens + 6 masks,
    positions 0..15, SDAR's block mask (bidirectional inside blocks of 4, causal across blocks)."""
    from safetensors.torch import save_file
    ids = tok(TEXTS["gpl"], add_special_tokens=False)["input_ids"][:10] + [mask_id] * 6
    L = len(ids)
    blk = torch.arange(L) // B
    mask = (blk[None, :] <= blk[:, None]).float()[None]  # [1, q, k], as generate.py builds it
    with torch.no_grad():
        logits = model(torch.tensor([ids]), attention_mask=mask, position_ids=torch.arange(L)[None]).logits
    save_file({"input_ids": torch.tensor(ids), "attention_mask": mask[0], "logits": logits[0].float().contiguous()},
              path, metadata={"info": "block_length=%d; position_ids=0..%d" % (B, L - 1)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="/tmp/sdar-ref", help="folder with generate.py and SDAR-4B-Chat/")
    ap.add_argument("--tiny", default=os.path.join(HERE, "tiny"))
    ap.add_argument("--out", default=os.path.join(HERE, "golden", "sdar_cases.json"))
    ap.add_argument("--commit", default="c2041a8333333d685f6e15122c84f60f51f85ebd")
    a = ap.parse_args()

    torch.set_num_threads(1)
    gen, modeling, _, shas = load_reference(a.ref)
    import transformers
    from transformers import AutoTokenizer, GenerationConfig
    model = modeling.SDARForCausalLM.from_pretrained(a.tiny, torch_dtype=torch.float32).eval()
    model64 = copy.deepcopy(model).double().eval()
    tok = AutoTokenizer.from_pretrained(a.tiny)
    mask_id = tok(tok.mask_token)["input_ids"][0]  # as generate.py does
    assert mask_id == model.config.mask_token_id
    stop_ids = GenerationConfig.from_pretrained(a.tiny).eos_token_id
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)

    kept, dropped, rng = [], [], [0, 0]
    for case in CASES:
        prompt_ids, prompt = build_prompt(tok, case)
        rec, quirk, (n, ok) = run_case(gen, model, tok, mask_id, stop_ids, case, prompt_ids)
        rec64, quirk64, (n64, ok64) = run_case(gen, model64, tok, mask_id, stop_ids, case, prompt_ids)
        rng[0] += n + n64
        rng[1] += ok + ok64
        if quirk or quirk64:
            raise SystemExit(f"{case['name']}: hits a tie (k > masks left, or tied confidences across the "
                             f"top-k cut); change the case")
        low = [k for k in LOGIT_MARGINS if rec[k] is not None and rec[k] < MIN_LOGIT_MARGIN]
        low += [k for k in PROB_MARGINS if rec[k] is not None and rec[k] < MIN_PROB_MARGIN]
        if low:
            raise SystemExit(f"{case['name']}: margins too small {low}; change the seed or the case")
        same = (rec64["output_ids"] == rec["output_ids"] and rec64["trace"] == rec["trace"]
                and rec64["nfe_breakdown"] == rec["nfe_breakdown"])
        rec["prompt"] = prompt
        rec = {k: rec[k] for k in ["name", "prompt_ids", "prompt"] + [k for k in rec if k not in
                                                                       ("name", "prompt_ids", "prompt")]}
        print(f"{case['name']:32s} P={len(prompt_ids):3d} nfe={rec['nfe']:3d} stop={rec['stopped_early']!s:5s} "
              f"fp64={'same' if same else 'DIFFERS'}  gen={rec['generated_ids']}")
        (kept if same else dropped).append(rec if same else case["name"])
    assert rng[0] == rng[1], f"argmax(probs/q) != multinomial in {rng[0] - rng[1]} of {rng[0]} draws"

    cfg = model.config
    data = dict(
        model="sdar-tiny", model_dir="tests/sdar/tiny",
        reference=dict(repo="JetAstra/SDAR", commit=a.commit, function="generate.block_diffusion_generate",
                       files_git_blob_sha1=shas,
                       stand_ins=["flash_attn.ops.triton.layer_norm.rms_norm_fn -> RMSNorm in float32",
                                  "flash_attn.flash_attn_func -> non-causal GQA softmax attention (float32 softmax)",
                                  "fused_linear_diffusion_cross_entropy -> empty stub (training only)"]),
        environment=dict(torch=torch.__version__, transformers=transformers.__version__, device="cpu",
                         dtype="float32", num_threads=1),
        mask_token_id=mask_id, eos_token_id=cfg.eos_token_id, generation_config_eos_token_id=stop_ids,
        vocab_size=cfg.vocab_size, tokenizer_size=len(tok),
        fp64_check=dict(cases_run=len(CASES), kept=len(kept), dropped=len(dropped), dropped_names=dropped,
                        note="each case re-run with model.double() (RoPE cos/sin stay float32), same seed; "
                             "kept only if output_ids, trace and forwards are identical"),
        rng_check=dict(multinomial_draws=rng[0], equal_to_argmax_probs_over_exponential=rng[1]),
        fields=dict(
            output_ids="the official return value: prompt + total_length-P tokens (blocks aligned to position 0); "
                       "after an early stop, later blocks stay mask_token_id",
            generated_ids="output_ids[prompt_length:]",
            first_stop_index="index in generated_ids of the first stopping_criteria_idx token (null: none)",
            stopped_early="the loop broke before the last block",
            nfe="model forwards: 1 prefill (full prompt blocks, if any) + per block (denoising steps + 1 store)",
            trace="one entry per denoising forward: block index, step, k = num_transfer_tokens[step], masks in "
                  "the block before the step, committed [position, token] (positions counted from the first "
                  "generated token; prompt positions of a partial block are never committed)",
            margins="min_* over the positions that matter (null: not applicable); see record_golden.py",
        ),
        cases=kept,
    )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    write_forward(model, tok, mask_id, os.path.join(os.path.dirname(a.out), "sdar_forward.safetensors"))
    with open(a.out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {a.out}: {len(kept)} cases kept, {len(dropped)} dropped {dropped}")


if __name__ == "__main__":
    main()
