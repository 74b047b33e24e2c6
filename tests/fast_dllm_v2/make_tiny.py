"""Build the tiny random Fast-dLLM v2 checkpoint in tests/fast_dllm_v2/tiny/ (the real
Efficient-Large-Model/Fast_dLLM_v2_7B format, tiny dims).

    python tests/fast_dllm_v2/make_tiny.py --ref /tmp/fdv2-ref --out tests/fast_dllm_v2/tiny

--ref/hub/ holds the checkpoint's published non-weight files (see tests/fast_dllm_v2/README.md):
config.json, generation_config.json, tokenizer_config.json, special_tokens_map.json,
added_tokens.json, chat_template.jinja. Their fields are kept (architectures, model_type, auto_map,
bd_size, the misspelled `conplemenrary_mask`, chat template, added-token order and flags); only sizes
and token ids change. The byte-level BPE vocabulary is ../shared/golden/dream-tiny/tokenizer.json's
(its regular tokens, renumbered from 0), with Qwen2's pre-tokenizer regex and NFC normalizer, followed
by the checkpoint's 23 added tokens in the official order (<|endoftext|> ... <|file_sep|>, |<MASK>|),
so |<MASK>| is the last tokenizer id as in the real model (151665), and the embedding (2048) is larger
than the tokenizer (2004), as in the real model (152064 > 151666).

Dims are Qwen2.5-style (GQA, q/k/v bias, no q/k norm, untied lm_head): hidden 32, 3 layers,
2 query heads / 1 KV head (head_dim 16), MLP 96, vocab 2048, float32 (folder < 1 MB).
Weights: seeded normal draws, no training. std 0.3 for projections and q/k/v biases (non-uniform
attention), embedding std 1.0, lm_head std LM_STD (peaked output distributions, so a 0.9 threshold
unmasks several tokens in some steps and one in others), norm weights uniform in [0.5, 1.5].
lm_head rows of |<MASK>| and of the padded ids (>= 2004) are zero: the official greedy decoder takes
the argmax over the full vocabulary, and committing the mask id leaves the position masked forever
(NOTES.md quirk). The rows of <|im_end|> and <|endoftext|> are scaled by STOP_SCALE so that some runs
stop early. Needs torch, safetensors, tokenizers (any recent versions).
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.environ.get("VLLM_OMNI_GOLDEN", os.path.join(HERE, "..", "..", "..", "shared", "golden"))
DREAM_TOK = os.path.join(GOLDEN, "dream-tiny", "tokenizer.json")

N_LAYERS = 3
DIMS = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=N_LAYERS, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=2048, max_position_embeddings=4096,
            max_window_layers=N_LAYERS, layer_types=["full_attention"] * N_LAYERS,
            torch_dtype="float32")
SEED = 20250930
STD = 0.3
LM_STD = 2.2
STOP_SCALE = 1.5
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
OFFICIAL_FIRST_ADDED = 151643  # <|endoftext|> in Qwen2.5 / Fast_dLLM_v2_7B


def build_tokenizer(ref, out):
    dream = json.load(open(DREAM_TOK))
    regular = sorted((i, t) for t, i in dream["model"]["vocab"].items() if i >= 3)  # 0-2: Dream specials
    vocab = {t: n for n, (_, t) in enumerate(regular)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in dream["model"]["merges"]]
    base = len(vocab)

    off = json.load(open(os.path.join(ref, "tokenizer_config.json")))
    added = [(int(k) - OFFICIAL_FIRST_ADDED + base, dict(off["added_tokens_decoder"][k]))
             for k in sorted(off["added_tokens_decoder"], key=int)]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for new_id, e in added:
        at = AddedToken(e["content"], single_word=e["single_word"], lstrip=e["lstrip"],
                        rstrip=e["rstrip"], normalized=e["normalized"], special=e["special"])
        got = tok.add_special_tokens([at]) if e["special"] else tok.add_tokens([at])
        assert got == 1 and tok.token_to_id(e["content"]) == new_id, (e, new_id)
    tok.save(os.path.join(out, "tokenizer.json"))
    # the slow-tokenizer files too: the real folder ships vocab.json + merges.txt (no tokenizer.json)
    with open(os.path.join(out, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

    cfg = dict(off)
    cfg["added_tokens_decoder"] = {str(i): e for i, e in added}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    ids = {e["content"]: i for i, e in added}
    with open(os.path.join(out, "added_tokens.json"), "w") as f:
        json.dump(dict(sorted(ids.items())), f, indent=2)
    shutil.copyfile(os.path.join(ref, "special_tokens_map.json"), os.path.join(out, "special_tokens_map.json"))
    shutil.copyfile(os.path.join(ref, "chat_template.jinja"), os.path.join(out, "chat_template.jinja"))
    return ids, base + len(added)


def build_weights(cfg, n_tok, mask_id, stop_ids):
    g = torch.Generator().manual_seed(SEED)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // nh

    def n(*shape, std=STD):
        return (torch.randn(*shape, generator=g) * std).float()

    def norm(d):
        return (0.5 + torch.rand(d, generator=g)).float()

    sd = {"model.embed_tokens.weight": n(V, H, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(H)
        sd[p + "self_attn.q_proj.weight"] = n(nh * hd, H)
        sd[p + "self_attn.q_proj.bias"] = n(nh * hd)
        sd[p + "self_attn.k_proj.weight"] = n(nkv * hd, H)
        sd[p + "self_attn.k_proj.bias"] = n(nkv * hd)
        sd[p + "self_attn.v_proj.weight"] = n(nkv * hd, H)
        sd[p + "self_attn.v_proj.bias"] = n(nkv * hd)
        sd[p + "self_attn.o_proj.weight"] = n(H, nh * hd)
        sd[p + "post_attention_layernorm.weight"] = norm(H)
        sd[p + "mlp.gate_proj.weight"] = n(I, H)
        sd[p + "mlp.up_proj.weight"] = n(I, H)
        sd[p + "mlp.down_proj.weight"] = n(H, I)
    sd["model.norm.weight"] = norm(H)
    lm = n(V, H, std=LM_STD)
    lm[mask_id] = 0.0           # the greedy argmax must never pick |<MASK>|
    lm[n_tok:] = 0.0            # padded ids beyond the tokenizer: logit 0
    lm[stop_ids] *= STOP_SCALE  # stop tokens come up now and then, so some cases stop early
    sd["lm_head.weight"] = lm
    return {k: v.contiguous() for k, v in sd.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="/tmp/fdv2-ref", help="folder holding hub/ (the published files)")
    ap.add_argument("--out", default=os.path.join(HERE, "tiny"))
    a = ap.parse_args()
    ref = os.path.join(a.ref, "hub")
    os.makedirs(a.out, exist_ok=True)

    ids, n_tok = build_tokenizer(ref, a.out)
    eot, im_end, mask_id = ids["<|endoftext|>"], ids["<|im_end|>"], ids["|<MASK>|"]

    cfg = json.load(open(os.path.join(ref, "config.json")))  # official field order and values
    cfg.update(DIMS)
    # as in the real config: bos = <|endoftext|>, eos = pad = <|im_end|>
    cfg.update(bos_token_id=eot, eos_token_id=im_end, pad_token_id=im_end)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    gen = json.load(open(os.path.join(ref, "generation_config.json")))
    gen.update(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)

    sd = build_weights(cfg, n_tok, mask_id, [eot, im_end])
    save_file(sd, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    size = os.path.getsize(os.path.join(a.out, "model.safetensors"))
    print(f"wrote {a.out}: tokenizer {n_tok} ids (mask {mask_id}, <|im_end|> {im_end}, "
          f"<|endoftext|> {eot}), {sum(v.numel() for v in sd.values())} params, {size} bytes")


if __name__ == "__main__":
    main()
