"""``QwenImagePipeline`` as a vLLM model: text encoder, MMDiT and VAE decoder
of a diffusers-format Qwen-Image folder (``config.py`` reads it).

For vLLM it is an attention-free pooling model: it keeps no KV cache, the
scheduler hands it each request's prompt tokens once, and the runner
(``worker/runner.py``) returns the finished image as the request's
``pooler_output`` in that same engine step; the denoising itself is
``diffusion/image_denoiser.py``. ``IdentityPooler`` only declares the
"plugin" pooling task: requests come through our IO-processor plugin
(``entrypoints/image_io.py``), which vLLM selects from the config.

Weights come from the folder's subfolders: the transformer through vLLM's
primary source (``allow_patterns_overrides``), the VAE and text encoder
through ``secondary_weights`` with a name prefix each; ``load_weights``
routes them by that prefix. ``load_format="dummy"`` fills every parameter.
"""

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.pooler import IdentityPooler
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.interfaces import IsAttentionFree
from vllm.model_executor.models.interfaces_base import attn_type

from vllm_omni.diffusion.flow_match import FlowMatchConfig
from vllm_omni.models.qwen_image.text_encoder import CausalPlan, QwenTextEncoder
from vllm_omni.models.qwen_image.transformer import QwenImageDiTConfig, QwenImageTransformer
from vllm_omni.models.qwen_image.vae import QwenImageVAEDecoder


@attn_type("attention_free")
class QwenImagePipeline(nn.Module, IsAttentionFree):
    is_pooling_model = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        hf = model_config.hf_config
        self.image_config = dict(hf.qwen_image)
        self.text_encoder = QwenTextEncoder(hf.text_encoder_config, vllm_config, "text_encoder")
        self.transformer = QwenImageTransformer(
            QwenImageDiTConfig.from_dict(hf.transformer_config), "transformer")
        self.vae = QwenImageVAEDecoder.from_config(hf.vae_config)
        self.latents_mean = list(hf.vae_config["latents_mean"])
        self.latents_std = list(hf.vae_config["latents_std"])
        self.scheduler_config = FlowMatchConfig.from_dict(hf.scheduler_config)
        self.pooler = IdentityPooler()
        # Where vLLM's default loader finds each component's weights.
        self.allow_patterns_overrides = ["transformer/*.safetensors"]
        self.secondary_weights = [
            DefaultModelLoader.Source(model_config.model, model_config.revision,
                                      subfolder=name, prefix=f"{name}.")
            for name in ("vae", "text_encoder")]

    @property
    def vae_scale_factor(self) -> int:
        return self.image_config["vae_scale_factor"]

    # vLLM's model interface: profiling and warm-up only (``forward`` encodes
    # the tokens as one prompt); generation goes through the runner.
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.text_encoder(input_ids, positions, CausalPlan([input_ids.numel()]))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Secondary sources arrive prefixed with their component; the primary
        # (the transformer's) unprefixed.
        parts = {"vae": [], "text_encoder": [], "transformer": []}
        for name, tensor in weights:
            component, _, rest = name.partition(".")
            if component in ("vae", "text_encoder"):
                parts[component].append((rest, tensor))
            else:
                parts["transformer"].append((name, tensor))
        return {f"{component}.{n}" for component, part in parts.items()
                for n in getattr(self, component).load_weights(part)}
