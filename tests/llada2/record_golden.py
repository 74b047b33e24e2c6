"""Record golden outputs of diffusers' LLaDA2Pipeline on tests/llada2/tiny (the official model code).

    tests/llada2/get_reference.sh DLLM_GIT            # the official model code -> /tmp/llada2-ref
    python tests/llada2/record_golden.py --ref /tmp/llada2-ref
    # writes tests/llada2/golden/llada2_cases.json and tests/llada2/golden/llada2_forward.safetensors

Decoding: diffusers 0.42.1's ``LLaDA2Pipeline`` with ``BlockRefinementScheduler``, called as it is
(``input_ids=``, ``output_type="seq"``, a seeded CPU ``torch.Generator``), float32 on CPU, batch 1.
Model: the hub's ``LLaDA2MoeModelLM`` (``_reference.py``), with one difference from calling it
directly, written down in NOTES.md: the pipeline passes a 2D padding mask, which the official code
turns into no mask at all (every position of the window attends to every other: the prompt and
earlier blocks to the block being decoded) or, once the window reaches the padded tail, a
token-causal one. The model is block-causal (its own ``generate()`` builds a block-diffusion mask
and so does its training), so the pipeline's model is wrapped to pass that mask instead: the
official ``generate()``'s mask for the window. Each case is also run with the mask the pipeline
passes, and the record says whether its tokens differ (``pipeline_2d_mask_same``).

Every case is re-run with the model in float64 (same seed) and kept only if its output and trace
are identical; the decision margins (threshold distances, top-k cuts, greedy logit gaps) are
recorded and must clear MIN_PROB_MARGIN / MIN_LOGIT_MARGIN. Cases with temperature > 0 and editing
off are also run through the official ``generate()`` (same seed through ``torch.manual_seed``) to
compare the two decoders (``official_generate_same``; NOTES.md says where they part).
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _reference as R  # noqa: E402

TINY = os.path.join(HERE, "tiny")
MIN_PROB_MARGIN = 1e-4
MIN_LOGIT_MARGIN = 1e-3
TEXTS = {
    "gpl": "The licenses for most software are designed to take away your freedom to share and "
           "change it. By contrast, the GNU General Public License is intended to guarantee your "
           "freedom to share and change free software.",
    "mit": "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
           "software and associated documentation files, to deal in the Software without "
           "restriction.",
    "apache": "Licensed under the Apache License, Version 2.0; you may not use this file except "
              "in compliance with the License. You may obtain a copy of the License at",
}
CHAT = [{"role": "user", "content": "What is free software?"}]
GREEDY = dict(temperature=0.0, top_k=None, top_p=None)


def case(name, text, P, gen, B, S, thr, edit, post=16, sampling=GREEDY, seed=0, eos_stop=True):
    return dict(name=name, text=text, P=P, gen=gen, B=B, S=S, threshold=thr, editing_threshold=edit,
                max_post_steps=post, sampling=sampling, seed=seed, eos_early_stop=eos_stop)


CASES = [
    case("greedy_b8_s8_edit", "gpl", 5, 24, 8, 8, 0.7, 0.5),
    case("greedy_b4_s4_noedit_aligned", "mit", 8, 20, 4, 4, 0.95, None),
    case("greedy_b16_s8_edit_post2", "apache", 11, 32, 16, 8, 0.5, 0.5, post=2),
    case("greedy_b32_s32_edit_chat", "chat", None, 40, 32, 32, 0.7, 0.5),
    case("greedy_b8_s4_thr1_edit", "mit", 13, 24, 8, 4, 1.0, 0.6, post=4),
    case("sample_b8_s4_edit", "gpl", 9, 24, 8, 4, 0.7, 0.5,
         sampling=dict(temperature=0.8, top_k=None, top_p=0.9), seed=71),
    case("sample_b4_s2_noedit", "apache", 6, 20, 4, 2, 0.9, None,
         sampling=dict(temperature=1.0, top_k=20, top_p=None), seed=5),
    case("sample_b16_s16_thr1_edit", "gpl", 17, 32, 16, 16, 1.0, 0.6, post=4,
         sampling=dict(temperature=0.7, top_k=None, top_p=None), seed=23),
    case("sample_b8_s8_noedit", "mit", 3, 16, 8, 8, 0.6, None,
         sampling=dict(temperature=0.9, top_k=50, top_p=0.95), seed=44),
    case("greedy_b4_s4_edit_stop", "apache", 7, 28, 4, 4, 0.7, 0.5),
    case("sample_b8_s8_edit_stop", "gpl", 10, 32, 8, 8, 0.6, 0.5,
         sampling=dict(temperature=1.0, top_k=None, top_p=None), seed=3),
    case("greedy_b8_s8_edit_no_early_stop", "mit", 6, 24, 8, 8, 0.7, 0.5, eos_stop=False),
    case("sample_b8_s4_thr1_noedit_aligned", "apache", 16, 24, 8, 4, 1.0, None,
         sampling=dict(temperature=0.9, top_k=None, top_p=None), seed=17, eos_stop=False),
]


class BlockCausal(torch.nn.Module):
    """The official model as the pipeline's ``model``, called with generate()'s block mask (or,
    ``block_length=None``, with the mask the pipeline passes); counts forwards, keeps the logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.block_length = None
        self.forwards = 0
        self.logits = None

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @property
    def device(self):
        return next(self.model.parameters()).device

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        if self.block_length is not None:
            attention_mask = R.block_causal_mask(input_ids.shape[1], self.block_length, self.dtype)
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        self.forwards += 1
        self.logits = out.logits
        return out


def prompt_ids(tok, c):
    if c["text"] == "chat":
        ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    else:
        ids = tok(TEXTS[c["text"]])["input_ids"][: c["P"]]
    return [int(i) for i in ids]


def margins(c, wrapper, kw, step_idx, step_margins):
    """Decision margins of one step: how far each decision is from flipping."""
    logits = wrapper.logits[0, -c["B"]:].double()
    probs = kw["sampled_probs"][0].double()
    was_active = kw["active_block"][0] | kw["transfer_index"][0]  # masks before the step
    editable = ~was_active & kw["editable"]
    m = {}
    conf = probs[was_active]
    if c["threshold"] <= 1.0 and len(conf):
        m["threshold"] = (conf - c["threshold"]).abs().min().item()
    k = schedule(c["B"], c["S"])[min(step_idx, c["S"] - 1)]
    if len(conf) > k and (conf > c["threshold"]).sum() < k:  # the top-k cut decides
        top = torch.sort(conf, descending=True).values
        m["selection"] = (top[k - 1] - top[k]).item()
    if c["editing_threshold"] and editable.any():
        m["editing"] = (probs[editable] - c["editing_threshold"]).abs().min().item()
    if c["sampling"]["temperature"] == 0:
        two = logits[was_active | editable].topk(2, dim=-1).values
        m["logit_gap"] = (two[:, 0] - two[:, 1]).min().item()
    step_margins.append(m)


def schedule(B, S):
    base, extra = divmod(B, S)
    return [base + (i < extra) for i in range(S)]


def run(pipe, wrapper, tok, c, ids, dtype, block_mask=True):
    wrapper.model.to(dtype)
    wrapper.block_length = c["B"] if block_mask else None
    wrapper.forwards = 0
    trace, step_margins = [], []

    def on_step(p, global_step, step_idx, kw):
        block = kw["block_x"].shape[1] // c["B"] - 1
        # Editable: decided before the step and not prompt (the scheduler's prompt_mask).
        positions = torch.arange(block * c["B"], (block + 1) * c["B"])
        kw["editable"] = positions >= len(ids)
        trace.append(dict(
            block=block, step=int(step_idx),
            committed=[[int(i), int(kw["block_x"][0, block * c["B"] + i])]
                       for i in torch.nonzero(kw["transfer_index"][0]).flatten().tolist()],
            edited=[[int(i), int(kw["block_x"][0, block * c["B"] + i])]
                    for i in torch.nonzero(kw["editing_transfer_index"][0]).flatten().tolist()]))
        margins(c, wrapper, kw, int(step_idx), step_margins)
        return {}

    s = c["sampling"]
    out = pipe(input_ids=torch.tensor([ids]), use_chat_template=False, gen_length=c["gen"],
               block_length=c["B"], num_inference_steps=c["S"], temperature=s["temperature"],
               top_p=s["top_p"], top_k=s["top_k"], threshold=c["threshold"],
               editing_threshold=c["editing_threshold"], max_post_steps=c["max_post_steps"],
               eos_early_stop=c["eos_early_stop"], eos_token_id=tok.eos_token_id,
               mask_token_id=tok.mask_token_id,
               generator=torch.Generator().manual_seed(c["seed"]), output_type="seq",
               callback_on_step_end=on_step,
               callback_on_step_end_tensor_inputs=["block_x", "transfer_index",
                                                   "editing_transfer_index", "sampled_probs",
                                                   "active_block"])
    return out.sequences[0].tolist(), trace, step_margins, wrapper.forwards


def official_generate(model, c, ids, eos, mask):
    """The official generate() on the float32 model. It casts its additive mask to bfloat16,
    which SDPA refuses next to float32 queries, so this one call runs the model's eager
    attention (which adds the mask in float32)."""
    s = c["sampling"]
    model.to(torch.float32)
    model.config._attn_implementation = "eager"
    torch.manual_seed(c["seed"])
    try:
        return _official_generate(model, c, ids, eos, mask, s)
    finally:
        model.config._attn_implementation = "sdpa"


def _official_generate(model, c, ids, eos, mask, s):
    out = model.generate(inputs=torch.tensor([ids]), temperature=s["temperature"],
                         block_length=c["B"], steps=c["S"], gen_length=c["gen"], top_p=s["top_p"],
                         top_k=s["top_k"], threshold=c["threshold"], eos_id=eos, mask_id=mask)
    return out[0].tolist()


def until_eos(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def write_forward(model, tok, path, B=8):
    """One forward of 13 prompt tokens and 11 masks with the block mask of B=8 (positions 0..23)."""
    ids = tok(TEXTS["gpl"])["input_ids"][:13] + [tok.mask_token_id] * 11
    x = torch.tensor([ids])
    model.to(torch.float32)
    with torch.no_grad():
        logits = model(x, attention_mask=R.block_causal_mask(24, B, torch.float32),
                       position_ids=torch.arange(24)[None]).logits[0]
    save_file({"input_ids": x[0], "logits": logits.contiguous(),
               "block_length": torch.tensor(B)}, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="/tmp/llada2-ref")
    ap.add_argument("--out", default=os.path.join(HERE, "golden"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    import diffusers
    import transformers
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline
    from transformers import AutoTokenizer

    modeling, configuration, digests, filled = R.load(a.ref)
    config = configuration.LLaDA2MoeConfig(**json.load(open(os.path.join(TINY, "config.json"))))
    config._attn_implementation = "sdpa"
    model = modeling.LLaDA2MoeModelLM(config).eval()
    model.load_state_dict(load_file(os.path.join(TINY, "model.safetensors")), strict=True)
    tok = AutoTokenizer.from_pretrained(TINY, trust_remote_code=False)
    eos, mask = tok.eos_token_id, tok.mask_token_id
    wrapper = BlockCausal(model)
    wrapper.mask_id = mask
    pipe = LLaDA2Pipeline(model=wrapper, scheduler=BlockRefinementScheduler(), tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)

    kept, dropped = [], []
    for c in CASES:
        ids = prompt_ids(tok, c)
        out32, trace32, m32, nfe = run(pipe, wrapper, tok, c, ids, torch.float32)
        out64, trace64, _, _ = run(pipe, wrapper, tok, c, ids, torch.float64)
        out2d, _, _, _ = run(pipe, wrapper, tok, c, ids, torch.float32, block_mask=False)
        low = {k: min((m[k] for m in m32 if k in m), default=None)
               for k in ("threshold", "selection", "editing", "logit_gap")}
        gaps = [v for k, v in low.items() if v is not None and k != "logit_gap"]
        reason = None
        if (out32, trace32) != (out64, trace64):
            reason = "float64 differs"
        elif any(v < MIN_PROB_MARGIN for v in gaps) or (low["logit_gap"] or 1) < MIN_LOGIT_MARGIN:
            reason = f"margin {low}"
        if reason:
            dropped.append((c["name"], reason))
            print(f"DROP {c['name']}: {reason}")
            continue
        record = dict(c, prompt_ids=ids, output_ids=out32, nfe=nfe, trace=trace32,
                      margins=low, eos_in_output=eos in out32,
                      first_eos=out32.index(eos) if eos in out32 else None,
                      pipeline_2d_mask_same=until_eos(out2d, eos) == until_eos(out32, eos))
        if c["sampling"]["temperature"] > 0 and not c["editing_threshold"]:
            official = official_generate(model, c, ids, eos, mask)
            record["official_generate_same"] = official == until_eos(out32, eos)[: len(official)]
        kept.append(record)
        print(f"keep {c['name']}: nfe {nfe}, eos at {record['first_eos']}, "
              f"2d-mask same {record['pipeline_2d_mask_same']}, "
              f"official {record.get('official_generate_same')}, margins {low}")

    os.makedirs(a.out, exist_ok=True)
    data = dict(
        reference=dict(
            decoder="diffusers LLaDA2Pipeline + BlockRefinementScheduler",
            diffusers=diffusers.__version__, transformers=transformers.__version__,
            torch=torch.__version__, model_code="ZHZisZZ/dllm@d8cc1190 "
            "dllm/pipelines/llada2/models (the hub's LLaDA2.0 remote code)",
            sha256=digests, stand_ins=filled,
            attention="the official generate()'s block-diffusion mask (NOTES.md)"),
        tokens=dict(eos=eos, mask=mask),
        fields=dict(
            output_ids="the pipeline's sequences: gen tokens after the prompt (later blocks stay "
                       "mask after an early stop)",
            trace="per forward: block, step index, committed and edited [position in block, "
                  "token]",
            margins="smallest distance of a decision to flipping (probabilities; logit_gap: "
                    "greedy top-1 minus top-2 logit)",
            pipeline_2d_mask_same="same tokens (up to eos) with the mask the pipeline passes",
            official_generate_same="same tokens as the official generate() (temperature > 0, "
                                   "editing off)"),
        dropped=dropped, cases=kept)
    with open(os.path.join(a.out, "llada2_cases.json"), "w") as f:
        json.dump(data, f, indent=1)
    write_forward(model, tok, os.path.join(a.out, "llada2_forward.safetensors"))
    print(f"{len(kept)} kept, {len(dropped)} dropped")


if __name__ == "__main__":
    main()
