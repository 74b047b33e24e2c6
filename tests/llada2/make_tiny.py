"""Build the tiny random LLaDA2 checkpoint in tests/llada2/tiny/ (the official format, tiny dims).

    python tests/llada2/make_tiny.py [--out tests/llada2/tiny]

config.json has the official fields of inclusionAI/LLaDA2.0-mini (``LLaDA2MoeModelLM``,
``model_type: llada2_moe``, the hub's ``auto_map``, BailingMoE-style MoE routing: sigmoid scores with
an expert bias, grouped top-k, ``routed_scaling_factor``, one shared expert, the first layer dense,
half of each head rotated) with tiny sizes: hidden 64, 3 layers (layer 0 dense, layers 1-2 MoE),
4 query / 2 KV heads of 16, 8 routed experts in 4 groups, 2 groups kept, top-2, expert MLP 32.

Weights use the official parameter names (``model.word_embeddings``,
``layers.N.attention.query_key_value``, ``mlp.experts.E.gate_proj``, ``mlp.gate.expert_bias``, ...):
seeded normal draws, never trained. std 0.3 for projections and the router, expert bias std 0.3 (it
changes which experts win), embedding std 1, lm_head std 0.5 (peaked but not saturated output
distributions), norm weights uniform in [0.5, 1.5]. The lm_head rows of ``<|mask|>`` and of the
padded ids past the tokenizer are zero (the mask token is never drawn); the row of
``<|endoftext|>`` (eos) is scaled by 1.6 so that some runs stop.

Tokenizer: the byte-level BPE vocabulary of ../shared/golden/dream-tiny (renumbered from 0), then
LLaDA2-style special tokens: ``<|startoftext|>``, ``<|endoftext|>`` (eos and pad), ``[CLS]``,
``[gMASK]``, ``<|mask|>`` (the mask token, eos + 3 as in the official 156892 / 156895), ``<role>``,
``</role>``, ``<|role_end|>``, and a chat template in the Ling format. The official tokenizer files
were not available offline: ids and template are modelled on what the public copies of the code
assume (README.md). Needs torch, safetensors, tokenizers.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))
DREAM_TOK = os.path.join(HERE, "..", "..", "..", "shared", "golden", "dream-tiny", "tokenizer.json")

SEED = 20250
STD = 0.3
BIAS_STD = 0.3
LM_STD = 0.5
EOS_SCALE = 1.6
SPECIAL = ("<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]", "<|mask|>", "<role>", "</role>",
           "<|role_end|>")
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<role>{{ message['role'] | upper }}</role>{{ message['content'] }}<|role_end|>"
    "{% endfor %}{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}")

CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    "embedding_dropout": 0.0,
    "first_k_dense_replace": 1,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
    "max_window_layers": 3,
    "model_type": "llada2_moe",
    "moe_intermediate_size": 32,
    "moe_router_enable_expert_bias": True,
    "n_group": 4,
    "norm_head": False,
    "norm_softmax": False,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "num_shared_experts": 1,
    "output_dropout": 0.0,
    "output_router_logits": False,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 600000,
    "rotary_dim": 8,
    "routed_scaling_factor": 2.5,
    "router_dtype": "fp32",
    "score_function": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 2,
    "torch_dtype": "float32",
    "use_bias": False,
    "use_cache": False,
    "use_qk_norm": True,
    "use_qkv_bias": False,
    "use_rmsnorm": True,
    "use_sliding_window": False,
    "vocab_size": 2048,
}


def build_tokenizer(out: str) -> dict:
    dream = json.load(open(DREAM_TOK))
    regular = sorted((i, t) for t, i in dream["model"]["vocab"].items() if i >= 3)
    vocab = {t: n for n, (_, t) in enumerate(regular)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in dream["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    ids = {}
    for content in SPECIAL:
        assert tok.add_special_tokens([AddedToken(content, normalized=False, special=True)]) == 1
        ids[content] = tok.token_to_id(content)
    tok.save(os.path.join(out, "tokenizer.json"))
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in ids.items()}
    config = {
        "added_tokens_decoder": decoder,
        "bos_token": "<|startoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "cls_token": "[CLS]",
        "eos_token": "<|endoftext|>",
        "extra_special_tokens": {},
        "gmask_token": "[gMASK]",
        "mask_token": "<|mask|>",
        "model_max_length": 2048,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    special_map = {k: config[k] for k in ("bos_token", "cls_token", "eos_token", "mask_token",
                                          "pad_token")}
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=2)
    return ids, len(vocab) + len(SPECIAL)


def build_weights(cfg: dict, n_tok: int, mask_id: int, eos_id: int) -> dict:
    g = torch.Generator().manual_seed(SEED)
    H, V, E = cfg["hidden_size"], cfg["vocab_size"], cfg["num_experts"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def n(*shape, std=STD):
        return (torch.randn(*shape, generator=g) * std).float()

    def norm(d):
        return (0.5 + torch.rand(d, generator=g)).float()

    def mlp(prefix, inter):
        return {f"{prefix}.gate_proj.weight": n(inter, H), f"{prefix}.up_proj.weight": n(inter, H),
                f"{prefix}.down_proj.weight": n(H, inter)}

    sd = {"model.word_embeddings.weight": n(V, H, std=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = norm(H)
        sd[f"{p}.attention.query_key_value.weight"] = n((nh + 2 * nkv) * hd, H)
        sd[f"{p}.attention.query_layernorm.weight"] = norm(hd)
        sd[f"{p}.attention.key_layernorm.weight"] = norm(hd)
        sd[f"{p}.attention.dense.weight"] = n(H, nh * hd)
        sd[f"{p}.post_attention_layernorm.weight"] = norm(H)
        if i < cfg["first_k_dense_replace"]:
            sd.update(mlp(f"{p}.mlp", cfg["intermediate_size"]))
            continue
        sd[f"{p}.mlp.gate.weight"] = n(E, H)
        sd[f"{p}.mlp.gate.expert_bias"] = n(E, std=BIAS_STD)
        for e in range(E):
            sd.update(mlp(f"{p}.mlp.experts.{e}", cfg["moe_intermediate_size"]))
        sd.update(mlp(f"{p}.mlp.shared_experts",
                      cfg["moe_intermediate_size"] * cfg["num_shared_experts"]))
    sd["model.norm.weight"] = norm(H)
    lm = n(V, H, std=LM_STD)
    lm[mask_id] = 0.0  # the mask token is never drawn
    lm[n_tok:] = 0.0  # padded ids past the tokenizer: logit 0
    lm[eos_id] *= EOS_SCALE  # eos comes up now and then, so some golden cases stop
    sd["lm_head.weight"] = lm
    return {k: v.contiguous() for k, v in sd.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "tiny"))
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    ids, n_tok = build_tokenizer(out)
    eos, mask = ids["<|endoftext|>"], ids["<|mask|>"]
    cfg = dict(CONFIG, pad_token_id=eos)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ids["<|startoftext|>"], "eos_token_id": eos,
                   "pad_token_id": eos}, f, indent=2)
    sd = build_weights(cfg, n_tok, mask, eos)
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {out}: tokenizer {n_tok} ids (eos {eos}, mask {mask}), "
          f"{sum(v.numel() for v in sd.values())} params")


if __name__ == "__main__":
    main()
