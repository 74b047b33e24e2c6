"""Build a tiny random-weight Qwen-Image in diffusers' on-disk format.

    .venv/bin/python scripts/make_qwen_image_tiny.py [--out DIR]

Writes ``vllm_omni/assets/qwen-image-tiny`` (about 2 MB, float32 safetensors), laid out
like the published ``Qwen/Qwen-Image``: ``model_index.json``, ``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``. Nothing is downloaded.

Component sizes follow diffusers' ``tests/pipelines/qwenimage/test_qwenimage.py``, with
these deliberate differences (all to keep the folder small or to make the tiny model
exercise the code paths of the real one):

* VAE ``base_dim`` 8 (the test uses 24); ``latents_mean``/``latents_std`` are the first 4
  entries of the published 16-channel values, not 0/1, so the de-normalisation matters.
* Text encoder: Qwen2.5-VL with hidden size 16 (= the transformer's
  ``joint_attention_dim``), vocabulary 2048 instead of 152064, one KV head (GQA, as in
  the real 28/4 heads), the published ``rms_norm_eps`` 1e-6, ``initializer_range`` 0.3
  (at 0.02 the tiny model's attention would be uniform, hiding RoPE/mask bugs) and tied
  word embeddings (the pipeline never uses ``lm_head``; untied it would cost 128 KiB).
* Tokenizer: the BPE of ``../shared/golden/dream-tiny`` (1984 byte-level tokens, a Qwen2
  tokenizer) rebuilt as a ``Qwen2Tokenizer`` (Qwen's pre-tokenizer regex and NFC), with
  merges appended so that every word of the Qwen-Image system prompt is one token.
  The template prefix ``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n`` then
  tokenizes to 34 tokens, as with the real tokenizer, so the pipeline's hard-coded
  ``prompt_template_encode_start_idx = 34`` drops exactly the system prompt. Qwen2.5-VL's
  vision special tokens are added after the merges.
* Scheduler: ``FlowMatchEulerDiscreteScheduler`` with the published Qwen-Image config
  (dynamic exponential shift, base/max shift 0.5/0.9, seq len 256/8192, terminal 0.02).
* Every parameter that initialisation leaves constant (zero biases, zero-init output
  layers, norm weights of ones) gets a seeded random perturbation, so no weight is
  trivial and a port that skips a bias or a norm scale shows up in the outputs.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "vllm_omni" / "assets" / "qwen-image-tiny"
DREAM_TOKENIZER = REPO.parent / "shared" / "golden" / "dream-tiny" / "tokenizer.json"

# QwenImagePipeline.prompt_template_encode up to the user's prompt.
TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n"
)
TEMPLATE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
PROMPT_TEMPLATE_DROP_IDX = 34  # QwenImagePipeline.prompt_template_encode_start_idx

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>"]
TEXT_VOCAB_SIZE = 2048

TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                   attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                   guidance_embeds=False, axes_dims_rope=(8, 4, 4))
# Published Qwen-Image VAE: z_dim 16, latents_mean/std below; we keep the first 4 channels.
VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True], dropout=0.0,
           latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],
           latents_std=[2.8184, 1.4541, 2.3275, 2.6558])
# Published Qwen/Qwen-Image scheduler/scheduler_config.json.
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False,
                 max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000, shift=1.0,
                 shift_terminal=0.02, stochastic_sampling=False, time_shift_type="exponential",
                 use_beta_sigmas=False, use_dynamic_shifting=True, use_exponential_sigmas=False,
                 use_karras_sigmas=False)


def text_config(token_ids: dict) -> dict:
    return dict(
        text_config=dict(
            vocab_size=TEXT_VOCAB_SIZE, hidden_size=16, intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                             "rope_theta": 1000000.0},
            bos_token_id=token_ids["<|endoftext|>"], eos_token_id=token_ids["<|im_end|>"],
            initializer_range=0.3, tie_word_embeddings=True),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=16),
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        tie_word_embeddings=True,
    )


# ---------------------------------------------------------------------------- tokenizer
def _qwen2_tokenizer(vocab: dict, merges: list, extra_special: list[str]):
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges),
                          extra_special_tokens=list(extra_special))


def build_tokenizer():
    """dream-tiny's BPE as a Qwen2Tokenizer whose template prefix is 34 tokens long."""
    src = json.loads(DREAM_TOKENIZER.read_text())
    vocab = dict(src["model"]["vocab"])
    merges = [tuple(m) for m in src["model"]["merges"]]
    for t in CHAT_TOKENS + ["<|endoftext|>"]:
        assert t in vocab, t  # ids 0, 1, 2 in dream-tiny
    next_id = max(vocab.values()) + 1
    # dream-tiny's Dream-only added tokens (<|beginoftext|>, <|mask|>) are not carried over.

    # Pieces of the system prompt that the real Qwen tokenizer keeps whole.
    tok = _qwen2_tokenizer(vocab, merges, CHAT_TOKENS)
    targets = ("system", "Describe", " image", " detailing", " color", " shape", " size",
               " texture", " quantity", " spatial", " relationships", " objects",
               " background", "user", "assistant")
    for _ in range(4):  # re-check until every target word is a single token
        changed = False
        for text in targets:
            pieces = tok.tokenize(text)
            if len(pieces) == 1:
                continue
            changed = True
            left = pieces[0]
            for right in pieces[1:]:
                merged = left + right
                merges.append((left, right))
                if merged not in vocab:
                    vocab[merged] = next_id
                    next_id += 1
                left = merged
            tok = _qwen2_tokenizer(vocab, merges, CHAT_TOKENS)
        if not changed:
            break
    # Qwen2.5-VL's vision special tokens, after the BPE vocabulary.
    for t in VISION_TOKENS:
        vocab[t] = next_id
        next_id += 1
    tok = _qwen2_tokenizer(vocab, merges, CHAT_TOKENS + VISION_TOKENS)
    assert len(tok) <= TEXT_VOCAB_SIZE, len(tok)
    n_prefix = len(tok(TEMPLATE_PREFIX)["input_ids"])
    assert n_prefix == PROMPT_TEMPLATE_DROP_IDX, (n_prefix, tok.tokenize(TEMPLATE_PREFIX))
    return tok, vocab, merges


def save_tokenizer_files(tok_dir: Path, vocab: dict, merges: list) -> None:
    """Keep the published layout (vocab.json + merges.txt, no tokenizer.json: 86 KB less)."""
    (tok_dir / "tokenizer.json").unlink()
    (tok_dir / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (tok_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


# ---------------------------------------------------------------------------- weights
@torch.no_grad()
def perturb_constant_params(module: torch.nn.Module, seed: int) -> list[str]:
    """Give every constant parameter (zeros, ones) a seeded random perturbation."""
    g = torch.Generator().manual_seed(seed)
    touched = []
    for name, p in module.named_parameters():
        flat = p.detach().reshape(-1)
        if flat.numel() and bool((flat == flat[0]).all()):
            base = float(flat[0])
            scale = 0.1 if base != 0.0 else 0.05
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
            touched.append(name)
    return touched


def build_components():
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**TRANSFORMER)
    perturb_constant_params(transformer, seed=1)

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(**VAE)
    perturb_constant_params(vae, seed=2)

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)

    tokenizer, vocab, merges = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t)
           for t in ["<|endoftext|>"] + CHAT_TOKENS + VISION_TOKENS}

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(**text_config(ids))
    config.dtype = torch.float32
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    perturb_constant_params(text_encoder, seed=3)

    return dict(transformer=transformer, vae=vae, scheduler=scheduler,
                text_encoder=text_encoder, tokenizer=tokenizer), (vocab, merges)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_tokenizer_roundtrip(tok, tok_dir: Path) -> None:
    from transformers import Qwen2Tokenizer

    loaded = Qwen2Tokenizer.from_pretrained(tok_dir)
    assert len(loaded) == len(tok) and loaded.all_special_tokens == tok.all_special_tokens
    text = (TEMPLATE_PREFIX + "A caf\u00e9 sign says 'h\u00e9llo 123', \u65e5\u672c \U0001F600\n"
            "<|vision_start|><|image_pad|><|vision_end|>" + TEMPLATE_SUFFIX)
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]


def smoke_test(out: Path) -> None:
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(out, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a red cat"))["input_ids"]
    print("template tokens:", len(ids), "dropped:", pipe.tokenizer.convert_ids_to_tokens(
        ids[:pipe.prompt_template_encode_start_idx])[-3:], "kept:",
        pipe.tokenizer.convert_ids_to_tokens(ids[pipe.prompt_template_encode_start_idx:]))
    image = pipe("a red cat", height=32, width=32, num_inference_steps=2, true_cfg_scale=1.0,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32), image.shape
    assert torch.isfinite(image).all()
    frac_clamped = ((image == 0) | (image == 1)).float().mean().item()
    print(f"32x32 2-step image: mean {image.mean():.4f} std {image.std():.4f} "
          f"min {image.min():.4f} max {image.max():.4f} clamped {frac_clamped:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    out: Path = args.out

    from diffusers import QwenImagePipeline

    components, (vocab, merges) = build_components()
    pipe = QwenImagePipeline(**components)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    save_tokenizer_files(out / "tokenizer", vocab, merges)
    check_tokenizer_roundtrip(components["tokenizer"], out / "tokenizer")

    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"{f.relative_to(out)}: {f.stat().st_size} bytes")
    total = folder_size(out)
    print(f"total: {total} bytes ({total / 2**20:.2f} MiB)")
    assert total < 3_000_000, total
    smoke_test(out)


if __name__ == "__main__":
    main()
