"""The diffusion model families vLLM-Omni serves.

Adding a family: one file under ``models/`` (config class + a ``DiffusionLM``
subclass) and one ``Family`` line below.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # vLLM ModelRegistry name (config.json "architectures")
    model_type: str  # transformers AutoConfig name (config.json "model_type")
    module: str  # where the config and model classes live
    config_class: str
    algorithms: tuple[str, ...]  # the first is the default
    # Default block length; None means one block over the whole canvas.
    default_block_length: int | None

    @property
    def model_class_path(self) -> str:
        return f"{self.module}:{self.architecture}"


FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family(
            name="llada",
            architecture="LLaDAModelLM",
            model_type="llada",
            module="vllm_omni.models.llada",
            config_class="LLaDAConfig",
            algorithms=("low_confidence",),
            default_block_length=32,
        ),
    )
}

FAMILIES_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES.values()}


def family_of(architectures) -> Family | None:
    for arch in architectures or ():
        if arch in FAMILIES:
            return FAMILIES[arch]
    return None
