"""Load the official LLaDA2 model code (unmodified, from --ref/hub) for record_golden.py (not a test).

The two official files are copied as they are into a temporary package. They were written for
transformers 4.x; on the repository's transformers 5.x (the one diffusers 0.42.1 needs) three names
they import are gone, and stand-ins fill exactly those gaps (each reproduces transformers 4.53.3):

- ``transformers.modeling_attn_mask_utils`` (removed): ``_prepare_4d_causal_attention_mask_for_sdpa``
  and ``_prepare_4d_causal_attention_mask``, which turn the model's ``attention_mask`` argument into
  SDPA's mask. A 4D mask passes through; a 2D mask that is all ones with as many keys as queries
  gives None (SDPA then runs without a mask: the model's attention is not causal); any other 2D mask
  gives the causal mask with the padded keys removed (additive, ``finfo.min``).
- ``transformers.utils.import_utils.is_torch_fx_available`` (removed): False (it only wraps a helper
  for torch.fx tracing).
- ``ROPE_INIT_FUNCTIONS["default"]`` (removed): plain RoPE, ``inv_freq = theta^(-2i/d)`` over the
  rotated part ``d = head_dim * partial_rotary_factor``, attention scaling 1.

Under transformers 4.53.3 nothing is replaced; ``record_golden.py --check-forward`` compares the two
(README.md).
"""
import hashlib
import importlib
import os
import shutil
import sys
import tempfile
import types

import torch

PKG = "llada2_official"
FILES = ("modeling_llada2_moe.py", "configuration_llada2_moe.py")


def _mask_utils_module() -> types.ModuleType:
    def for_sdpa(attention_mask, input_shape, inputs_embeds, past_key_values_length,
                 sliding_window=None):
        q_len = input_shape[-1]
        kv_len = q_len + past_key_values_length
        if attention_mask is None:
            return None if q_len in (1, kv_len) else causal(None, input_shape, inputs_embeds,
                                                            past_key_values_length)
        if attention_mask.dim() == 4:
            return attention_mask
        if bool(torch.all(attention_mask == 1)) and q_len in (1, kv_len):
            return None
        return causal(attention_mask, input_shape, inputs_embeds, past_key_values_length)

    def causal(attention_mask, input_shape, inputs_embeds, past_key_values_length,
               sliding_window=None):
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        batch, q_len = input_shape[0], input_shape[-1]
        kv_len = q_len + past_key_values_length
        dtype, device = inputs_embeds.dtype, inputs_embeds.device
        low = torch.finfo(dtype).min
        rows = torch.arange(q_len, device=device)[:, None] + past_key_values_length
        future = torch.arange(kv_len, device=device)[None, :] > rows
        mask = torch.zeros(batch, 1, q_len, kv_len, dtype=dtype, device=device)
        mask = mask.masked_fill(future, low)
        if attention_mask is not None:
            padded = attention_mask[:, None, None, :kv_len].to(device) == 0
            mask = mask.masked_fill(padded, low)
        return mask

    module = types.ModuleType("transformers.modeling_attn_mask_utils")
    module._prepare_4d_causal_attention_mask_for_sdpa = for_sdpa
    module._prepare_4d_causal_attention_mask = causal
    return module


def _default_rope(config, device=None, seq_len=None, **kwargs):
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (config.rope_theta ** exponents), 1.0


def install_stand_ins() -> list[str]:
    """Fill the transformers 4.x names the official files import; returns which were filled."""
    import transformers
    import transformers.modeling_rope_utils as rope_utils
    import transformers.utils.import_utils as import_utils

    filled = []
    try:
        importlib.import_module("transformers.modeling_attn_mask_utils")
    except ImportError:
        sys.modules["transformers.modeling_attn_mask_utils"] = _mask_utils_module()
        filled.append("modeling_attn_mask_utils")
    if not hasattr(import_utils, "is_torch_fx_available"):
        import_utils.is_torch_fx_available = lambda: False
        filled.append("is_torch_fx_available")
    if "default" not in rope_utils.ROPE_INIT_FUNCTIONS:
        rope_utils.ROPE_INIT_FUNCTIONS["default"] = _default_rope
        filled.append("ROPE_INIT_FUNCTIONS['default']")
    del transformers
    return filled


def load(ref_dir: str):
    """(modeling module, configuration module, {file: sha256}, stand-ins filled)."""
    hub = os.path.join(ref_dir, "hub")
    filled = install_stand_ins()
    tmp = tempfile.mkdtemp(prefix="llada2_ref_")
    pkg = os.path.join(tmp, PKG)
    os.makedirs(pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    digests = {}
    for name in FILES:
        shutil.copy(os.path.join(hub, name), os.path.join(pkg, name))
        digests[name] = hashlib.sha256(open(os.path.join(hub, name), "rb").read()).hexdigest()
    sys.path.insert(0, tmp)
    modeling = importlib.import_module(f"{PKG}.modeling_llada2_moe")
    configuration = importlib.import_module(f"{PKG}.configuration_llada2_moe")
    return modeling, configuration, digests, filled


def block_causal_mask(length: int, block_length: int, dtype: torch.dtype) -> torch.Tensor:
    """The official generate()'s block-diffusion mask over the first ``length`` positions:
    additive, 0 where query block >= key block, -inf elsewhere ([1, 1, L, L]; generate() casts it
    to bfloat16, the model's dtype; here the model's dtype is float32/float64)."""
    blocks = torch.arange(length) // block_length
    allowed = blocks[:, None] >= blocks[None, :]
    return torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, float("-inf"))[None, None]
