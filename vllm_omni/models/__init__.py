"""The diffusion model families vLLM-Omni serves.

Adding a family: one file under ``models/`` (config class + a ``DiffusionLM``
subclass) and one ``Family`` line below.
"""

from dataclasses import dataclass, field

# Knobs every family takes (diffusion/params.py says what each means).
COMMON_KNOBS = ("algorithm", "steps", "block_length", "cache")


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
    # Knobs beyond COMMON_KNOBS that this family's algorithms read, and
    # their defaults (None: off).
    knobs: dict = field(default_factory=dict)

    @property
    def allowed_knobs(self) -> tuple[str, ...]:
        return COMMON_KNOBS + tuple(self.knobs)

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
            algorithms=("low_confidence", "random"),
            default_block_length=32,
            knobs={"threshold": None},
        ),
        Family(
            name="dream",
            architecture="DreamModel",
            model_type="Dream",
            module="vllm_omni.models.dream",
            config_class="DreamConfig",
            algorithms=("maskgit_plus", "topk_margin", "entropy", "origin"),
            default_block_length=None,
            # Dream's generation config carries top_k=50, top_p=1.0 (see
            # ../shared/golden/README.md): the reference filters to the top 50.
            knobs={"eps": 1e-3, "top_k": 50, "top_p": None, "alg_temp": 0.0},
        ),
    )
}

FAMILIES_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES.values()}


def family_of(architectures) -> Family | None:
    for arch in architectures or ():
        if arch in FAMILIES:
            return FAMILIES[arch]
    return None
