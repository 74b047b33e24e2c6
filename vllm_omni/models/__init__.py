"""The diffusion model families vLLM-Omni serves.

Adding a family: one file under ``models/`` (config class + a ``DiffusionLM``
subclass) and one ``Family`` line below; its decoding algorithms register
themselves for it (``diffusion/algorithms/``), and the knobs it takes and
their defaults are in the knob table (``diffusion/knobs.py``).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # the key of the knob table and the algorithm registry
    title: str  # for people (the README's knob table)
    architecture: str  # vLLM ModelRegistry name (config.json "architectures")
    model_type: str  # transformers AutoConfig name (config.json "model_type")
    module: str  # where the config and model classes live
    config_class: str
    # Causal across blocks (SDAR): finished blocks' K/V are final, go into
    # vLLM's KV pages once and may be shared through prefix caching
    # (``docs/architecture/overview.md``, "Block-causal families").
    block_causal: bool = False
    # The config key that fixes a block-causal family's block length (its
    # training block, Fast-dLLM v2's ``bd_size``); requests do not choose it.
    # None: the ``block_length`` knob.
    block_length_key: str | None = None

    @property
    def model_class_path(self) -> str:
        return f"{self.module}:{self.architecture}"


FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family(
            name="llada",
            title="LLaDA",
            architecture="LLaDAModelLM",
            model_type="llada",
            module="vllm_omni.models.llada",
            config_class="LLaDAConfig",
        ),
        Family(
            name="dream",
            title="Dream",
            architecture="DreamModel",
            model_type="Dream",
            module="vllm_omni.models.dream",
            config_class="DreamConfig",
        ),
        Family(
            name="sdar",
            title="SDAR",
            architecture="SDARForCausalLM",
            model_type="sdar",
            module="vllm_omni.models.sdar",
            config_class="SDARConfig",
            block_causal=True,
        ),
        Family(
            name="fast_dllm_v2",
            title="Fast-dLLM v2",
            architecture="Fast_dLLM_QwenForCausalLM",
            model_type="Fast_dLLM_Qwen",
            module="vllm_omni.models.fast_dllm_v2",
            config_class="Fast_dLLM_QwenConfig",
            block_causal=True,
            block_length_key="bd_size",
        ),
        Family(
            name="llada2",
            title="LLaDA2",
            architecture="LLaDA2MoeModelLM",
            model_type="llada2_moe",
            module="vllm_omni.models.llada2",
            config_class="LLaDA2MoeConfig",
            block_causal=True,
        ),
    )
}

FAMILIES_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES.values()}


def family_of(architectures) -> Family | None:
    for arch in architectures or ():
        if arch in FAMILIES:
            return FAMILIES[arch]
    return None
