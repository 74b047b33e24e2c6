"""Build the tiny random SDAR checkpoint in tests/sdar/tiny/ (real SDAR-4B-Chat format, tiny dims).

    python tests/sdar/make_tiny.py --ref /tmp/sdar-ref --out tests/sdar/tiny

--ref is a folder with the official files of JetAstra/SDAR (see tests/sdar/README.md):
SDAR-4B-Chat/{config.json, tokenizer_config.json, generation_config.json}. Their fields are kept
(architectures, model_type, auto_map, chat template, added-token order and flags); only the sizes and
token ids change. The byte-level BPE vocabulary comes from ../shared/golden/dream-tiny/tokenizer.json
(its regular tokens, renumbered from 0), followed by SDAR's 27 added tokens (<|endoftext|> ... <|MASK|>)
in the official order, so <|MASK|> is the last tokenizer id, as in SDAR (151669). The embedding is
larger (2048) than the tokenizer, as in SDAR (151936).

Weights: seeded normal draws, no training. std 0.3 for the projections (non-uniform attention),
embedding std 1.0, lm_head std 0.8 (peaked output distributions), norm
weights uniform in [0.5, 1.5]. lm_head rows of <|MASK|> and of the unused padded ids (>= len(tokenizer))
are zero (SDAR-NOTES quirk 7: a sampled mask id makes the official sampler crash); the rows of the two
stop tokens (<|endoftext|>, <|im_end|>) are scaled by 1.5 so that some runs stop early.
Needs torch, safetensors, tokenizers (any recent versions).
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))
DREAM_TOK = os.path.join(HERE, "..", "..", "..", "shared", "golden", "dream-tiny", "tokenizer.json")

DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=2048, max_position_embeddings=2048,
            max_window_layers=3, rope_theta=10000, torch_dtype="float32")
SEED = 1234
STD = 0.3
LM_STD = 0.8  # sharper output distributions (top-1 probabilities spread over ~0.1-0.9)
STOP_SCALE = 1.5  # lm_head rows of <|endoftext|> and <|im_end|> scaled up
# Qwen2's pre-tokenizer regex (as in Qwen2/Qwen3/SDAR tokenizer.json)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
OFFICIAL_FIRST_ADDED = 151643  # <|endoftext|> in SDAR / Qwen3


def build_tokenizer(ref_dir, out):
    dream = json.load(open(DREAM_TOK))
    dv = dream["model"]["vocab"]
    regular = sorted((i, t) for t, i in dv.items() if i >= 3)  # ids 0-2 are Dream's special tokens
    vocab = {t: n for n, (_, t) in enumerate(regular)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in dream["model"]["merges"]]
    base = len(vocab)

    off_cfg = json.load(open(os.path.join(ref_dir, "tokenizer_config.json")))
    added = []  # (new_id, entry) in official id order
    for k in sorted(off_cfg["added_tokens_decoder"], key=int):
        e = dict(off_cfg["added_tokens_decoder"][k])
        added.append((int(k) - OFFICIAL_FIRST_ADDED + base, e))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    from tokenizers import AddedToken
    for new_id, e in added:
        at = AddedToken(e["content"], single_word=e["single_word"], lstrip=e["lstrip"],
                        rstrip=e["rstrip"], normalized=e["normalized"], special=e["special"])
        got = tok.add_special_tokens([at]) if e["special"] else tok.add_tokens([at])
        assert got == 1 and tok.token_to_id(e["content"]) == new_id, (e, new_id)
    tok.save(os.path.join(out, "tokenizer.json"))

    # slow-tokenizer files too (Qwen2Tokenizer reads vocab.json + merges.txt), as the official folder has
    json.dump(vocab, open(os.path.join(out, "vocab.json"), "w"), ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

    cfg = dict(off_cfg)
    cfg["added_tokens_decoder"] = {str(i): e for i, e in added}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    ids = {e["content"]: i for i, e in added}
    special_map = {
        "additional_special_tokens": off_cfg["additional_special_tokens"],
        "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "mask_token": off_cfg["mask_token"],
    }
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=2)
    with open(os.path.join(out, "added_tokens.json"), "w") as f:
        json.dump(dict(sorted(ids.items())), f, indent=2)
    return ids, base + len(added)


def build_weights(cfg, n_tok, mask_id, stop_ids):
    g = torch.Generator().manual_seed(SEED)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def n(*shape, std=STD):
        return (torch.randn(*shape, generator=g) * std).float()

    def norm(d):
        return (0.5 + torch.rand(d, generator=g)).float()

    sd = {"model.embed_tokens.weight": n(V, H, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(H)
        sd[p + "self_attn.q_proj.weight"] = n(nh * hd, H)
        sd[p + "self_attn.k_proj.weight"] = n(nkv * hd, H)
        sd[p + "self_attn.v_proj.weight"] = n(nkv * hd, H)
        sd[p + "self_attn.o_proj.weight"] = n(H, nh * hd)
        sd[p + "self_attn.q_norm.weight"] = norm(hd)
        sd[p + "self_attn.k_norm.weight"] = norm(hd)
        sd[p + "post_attention_layernorm.weight"] = norm(H)
        sd[p + "mlp.gate_proj.weight"] = n(I, H)
        sd[p + "mlp.up_proj.weight"] = n(I, H)
        sd[p + "mlp.down_proj.weight"] = n(H, I)
    sd["model.norm.weight"] = norm(H)
    lm = n(V, H, std=LM_STD)
    lm[mask_id] = 0.0        # never sample <|MASK|> (quirk 7)
    lm[n_tok:] = 0.0         # padded ids beyond the tokenizer: logit 0
    lm[stop_ids] *= STOP_SCALE  # stop tokens come up now and then, so golden cases can stop early
    sd["lm_head.weight"] = lm
    return {k: v.contiguous() for k, v in sd.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="/tmp/sdar-ref", help="folder holding SDAR-4B-Chat/ official files")
    ap.add_argument("--out", default=os.path.join(HERE, "tiny"))
    a = ap.parse_args()
    ref_dir = os.path.join(a.ref, "SDAR-4B-Chat")
    os.makedirs(a.out, exist_ok=True)

    ids, n_tok = build_tokenizer(ref_dir, a.out)
    eos, im_end, mask_id = ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|MASK|>"]

    cfg = json.load(open(os.path.join(ref_dir, "config.json")))  # official field order and values
    cfg.update(DIMS)
    cfg.update(bos_token_id=eos, eos_token_id=eos, mask_token_id=mask_id)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    gen = json.load(open(os.path.join(ref_dir, "generation_config.json")))
    gen.update(bos_token_id=eos, eos_token_id=[im_end, eos], pad_token_id=eos)
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=4)

    sd = build_weights(cfg, n_tok, mask_id, [eos, im_end])
    save_file(sd, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {a.out}: tokenizer {n_tok} ids (mask {mask_id}, eos {eos}, im_end {im_end}), "
          f"{sum(v.numel() for v in sd.values())} params")


if __name__ == "__main__":
    main()
