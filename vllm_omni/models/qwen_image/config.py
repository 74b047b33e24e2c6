"""Reading a diffusers-format Qwen-Image folder as a vLLM model config.

The folder is what diffusers publishes for Qwen/Qwen-Image: ``model_index.json``
(``_class_name: QwenImagePipeline``) and one subfolder per component with its
own config. vLLM reads a config through a parser chosen by ``config_format``;
``register()`` registers this one as ``"qwen_image"``, so the folder loads
with ``LLM(model=DIR, config_format="qwen_image", worker_cls=...)`` (or
``--config-format qwen_image``), no conversion step. vLLM's ``"auto"`` knows
only ``config.json`` and ``params.json`` and has no hook for other formats,
hence the explicit format.

The config is a plain ``PretrainedConfig`` for vLLM (architecture
``QwenImagePipeline``, no LLM dimensions: the model is attention-free for
vLLM) with each component's JSON kept under names transformers does not read
as a text config (``get_text_config`` adopts attributes named ``text_encoder``
or ``text_config``), and ``io_processor_plugin`` naming our request plugin,
which vLLM then selects by itself.
"""

import json
from pathlib import Path

from transformers import PretrainedConfig
from vllm.transformers_utils.config_parser_base import ConfigParserBase

from vllm_omni.models.qwen_image.pipeline_math import vae_scale_factor

CONFIG_FORMAT = "qwen_image"
ARCHITECTURE = "QwenImagePipeline"
IO_PROCESSOR = "vllm_omni_image"
COMPONENTS = ("transformer", "vae", "text_encoder", "scheduler")
# Request limits (the IO processor reads them from the config).
MAX_IMAGE_SIDE = 2048
MAX_INFERENCE_STEPS = 1000
DEFAULT_SAMPLE_SIZE = 128  # diffusers: default height/width = 128 * vae_scale_factor


class QwenImageConfig(PretrainedConfig):
    model_type = "qwen_image_pipeline"


def _read(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _component_config(root: Path, name: str) -> dict:
    sub = root / name
    for file in ("config.json", "scheduler_config.json"):
        if (sub / file).exists():
            return _read(sub / file)
    raise ValueError(f"{root} has no {name}/config.json (a diffusers Qwen-Image folder has "
                     f"{', '.join(COMPONENTS)})")


def load_qwen_image_config(model: str | Path) -> QwenImageConfig:
    root = Path(model)
    index = root / "model_index.json"
    if not index.exists():
        raise ValueError(f"config_format={CONFIG_FORMAT!r} expects a diffusers folder with "
                         f"model_index.json; {root} has none")
    pipeline = _read(index).get("_class_name")
    if pipeline != ARCHITECTURE:
        raise ValueError(f"{index}: _class_name is {pipeline!r}; only {ARCHITECTURE} is supported")
    parts = {name: _component_config(root, name) for name in COMPONENTS}
    text = parts["text_encoder"].get("text_config") or parts["text_encoder"]
    vsf = vae_scale_factor(parts["vae"].get("temperal_downsample", [False, True, True]))
    return QwenImageConfig(
        architectures=[ARCHITECTURE],
        dtype=parts["text_encoder"].get("dtype") or parts["text_encoder"].get("torch_dtype")
        or "bfloat16",
        # Prompt tokens: the template's 34 plus up to 1024 of the prompt.
        max_position_embeddings=min(text.get("max_position_embeddings", 1 << 20), 1024 + 34),
        io_processor_plugin=IO_PROCESSOR,
        transformer_config=parts["transformer"],
        vae_config=parts["vae"],
        text_encoder_config=parts["text_encoder"],
        scheduler_config=parts["scheduler"],
        qwen_image={"vae_scale_factor": vsf, "default_size": DEFAULT_SAMPLE_SIZE * vsf,
                    "max_image_side": MAX_IMAGE_SIDE, "max_inference_steps": MAX_INFERENCE_STEPS,
                    # With a terminal shift diffusers' one-step schedule is NaN (0 / 0).
                    "min_inference_steps": 2 if parts["scheduler"].get("shift_terminal") else 1},
    )


class QwenImageConfigParser(ConfigParserBase):
    def parse(self, model, trust_remote_code, revision=None, code_revision=None, **kwargs):
        config = load_qwen_image_config(model)
        return config.to_dict(), config
