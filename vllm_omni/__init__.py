"""vLLM-Omni: diffusion language models served by vLLM v1.

``register`` is vLLM's ``vllm.general_plugins`` entry point (pyproject.toml):
vLLM calls it in every process it starts, before it reads a model config.
"""

__version__ = "0.1.0"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_omni.engine_config import DiffusionEngineConfig
    from vllm_omni.models import FAMILIES

    for family in FAMILIES.values():
        if family.architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(family.architecture, family.model_class_path)
        module = __import__(family.module, fromlist=[family.config_class])
        AutoConfig.register(
            family.model_type, getattr(module, family.config_class), exist_ok=True
        )
        MODELS_CONFIG_MAP.setdefault(family.architecture, DiffusionEngineConfig)
    _register_image_models()


def _register_image_models() -> None:
    """Qwen-Image from a diffusers folder: its config format, its model class
    and its engine settings (``docs/architecture/images.md``)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.config import get_config_parser, register_config_parser

    from vllm_omni.engine_config import ImageEngineConfig
    from vllm_omni.models.qwen_image import config

    try:
        get_config_parser(config.CONFIG_FORMAT)
    except ValueError:
        register_config_parser(config.CONFIG_FORMAT)(config.QwenImageConfigParser)
    if config.ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(config.ARCHITECTURE,
                                     "vllm_omni.models.qwen_image.model:QwenImagePipeline")
    MODELS_CONFIG_MAP.setdefault(config.ARCHITECTURE, ImageEngineConfig)
