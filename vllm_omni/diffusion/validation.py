"""Request validation at submission time, through vLLM's own hook.

vLLM calls ``validate_params`` of every custom logits processor class named in
``ModelConfig.logits_processors`` while it checks a request's
``SamplingParams`` in the front end (``LLM.generate`` raises vLLM's
``VLLMValidationError``, the OpenAI server answers 400). The engine config hook
(``vllm_omni.engine_config``) adds one such class for diffusion models only.

The class must know the model family, the engine-wide defaults and (for a
block-causal family) the KV page size its block lengths must divide and the
block length its checkpoint fixes, and vLLM names it by a ``module:qualname``
string that every process re-imports; so the name itself carries them
(``llada__<hex of {"defaults", "page_size", "block_length",
"pinned_block_length"} as JSON>``) and
this module's ``__getattr__`` rebuilds the class from its name.
"""

import json
from functools import cache

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import LogitsProcessor

from vllm_omni.compat import RequestError
from vllm_omni.models import FAMILIES_BY_NAME
from vllm_omni.diffusion.params import resolve_params


# SamplingParams fields the denoiser does not apply, with their "off" value:
# a request that sets one is refused rather than silently decoded without it.
UNSUPPORTED = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_p": 0.0,
    "min_tokens": 0,
    "logit_bias": None,
    "allowed_token_ids": None,
    "bad_words": None,
    "structured_outputs": None,
    "logprobs": None,
    "prompt_logprobs": None,
}
WHY = {
    "logprobs": "a diffusion step commits tokens by confidence, which is not the "
    "output distribution's log-probability",
}


class DiffusionRequestValidator(LogitsProcessor):
    """Checks the diffusion knobs of each request; never touches logits."""

    family_name = ""
    engine_defaults: dict = {}
    page_size: int | None = None
    block_length: int | None = None
    pinned_block_length: int | None = None

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        for field, off in UNSUPPORTED.items():
            if getattr(sampling_params, field, off) not in (off, None, [], {}):
                why = WHY.get(field, "the denoiser does not apply it")
                raise RequestError(
                    f"{field} is not supported by diffusion decoding ({why}); leave it unset",
                    parameter=field,
                )
        resolve_params(FAMILIES_BY_NAME[cls.family_name], sampling_params, cls.engine_defaults,
                       cls.page_size, cls.block_length, cls.pinned_block_length)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def validator_qualname(family_name: str, engine_defaults: dict,
                       page_size: int | None = None, block_length: int | None = None,
                       pinned_block_length: int | None = None) -> str:
    spec = {"defaults": engine_defaults, "page_size": page_size, "block_length": block_length,
            "pinned_block_length": pinned_block_length}
    blob = json.dumps(spec, sort_keys=True).encode().hex()
    return f"{__name__}:{family_name}__{blob}"


@cache
def _validator_class(name: str) -> type[DiffusionRequestValidator]:
    family_name, blob = name.split("__", 1)
    if family_name not in FAMILIES_BY_NAME:
        raise AttributeError(name)
    spec = json.loads(bytes.fromhex(blob))
    return type(
        name,
        (DiffusionRequestValidator,),
        {
            "family_name": family_name,
            "engine_defaults": spec["defaults"],
            "page_size": spec["page_size"],
            "block_length": spec.get("block_length"),
            "pinned_block_length": spec.get("pinned_block_length"),
            "__module__": __name__,
            "__qualname__": name,
        },
    )


def __getattr__(name: str):
    if "__" not in name or name.startswith("__"):
        raise AttributeError(name)
    return _validator_class(name)
