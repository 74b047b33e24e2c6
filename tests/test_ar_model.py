"""An autoregressive model under our worker generates as plain vLLM does:
a tiny random Qwen2 built here, greedy tokens compared with transformers'
own greedy generation of the same checkpoint."""

import pytest
import torch
from vllm import SamplingParams

from conftest import WORKER

PROMPTS = [[5, 17, 300, 42, 7], [1, 2, 3], list(range(100, 140))]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        # Large weights: peaked logits, so float32 rounding cannot flip a choice.
        initializer_range=0.3, tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path)
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                 attention_mask=torch.ones_like(ids), pad_token_id=0)
            expected.append(out[0, len(prompt):].tolist())
    return path, expected


def test_ar_model_generates_as_transformers(tiny_qwen2):
    from vllm import LLM

    path, expected = tiny_qwen2
    llm = LLM(model=str(path), worker_cls=WORKER, skip_tokenizer_init=True,
              dtype="float32", max_model_len=256, seed=0)
    try:
        sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == expected
    finally:
        del llm
