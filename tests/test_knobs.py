"""The knob table (``vllm_omni/diffusion/knobs.py``) and the algorithm
registry agree with each other, with the model families and with the README;
no engine needed."""

import runpy

import pytest
from vllm import SamplingParams

from conftest import REPO
from vllm_omni.compat import RequestError
from vllm_omni.diffusion.algorithms import ALGORITHMS, algorithms_for, register_algorithm
from vllm_omni.diffusion.knobs import KNOBS, KNOBS_BY_NAME, knobs_of
from vllm_omni.diffusion.params import resolve_params
from vllm_omni.models import FAMILIES_BY_NAME


def test_readme_knob_table_is_the_scripts_output():
    script = runpy.run_path(str(REPO / "scripts" / "knob_table.py"))
    readme = (REPO / "README.md").read_text()
    assert script["readme_table"](readme) == script["markdown"](), (
        "README.md's knob table is stale: run .venv/bin/python scripts/knob_table.py --write")


@pytest.mark.parametrize("family", FAMILIES_BY_NAME)
def test_every_family_has_its_default_algorithm_and_every_knob_is_read(family):
    names = algorithms_for(family)
    assert names and names[0] == KNOBS_BY_NAME["algorithm"].default_for(family)
    read = {k for name in names for k in ALGORITHMS[name].knobs}
    own = {k.name for k in knobs_of(family) if k.families is not None and not k.loop}
    assert own == read, "a family's own knobs are exactly those its algorithms read"


def test_an_algorithm_must_read_knobs_its_families_take():
    with pytest.raises(ValueError, match="not in the knob table"):
        register_algorithm("x", families=("llada",), knobs=("nope",))(lambda *a: None)
    with pytest.raises(ValueError, match="do not take"):
        register_algorithm("x", families=("llada",), knobs=("eps",))(lambda *a: None)
    with pytest.raises(ValueError, match="registered twice"):
        register_algorithm("random", families=("llada",))(lambda *a: None)
    assert "x" not in ALGORITHMS


@pytest.mark.parametrize("family", FAMILIES_BY_NAME)
def test_no_knobs_give_the_tables_defaults(family):
    fixed = 32 if FAMILIES_BY_NAME[family].block_length_key else None  # the checkpoint's
    params = resolve_params(FAMILIES_BY_NAME[family],
                            SamplingParams(temperature=0, max_tokens=64), block_length=fixed)
    for knob in KNOBS:
        default = knob.default_for(family) if knob.applies_to(family) else None
        if knob.name == "block_length":
            assert params.block_length == (fixed or default or 64)
        elif knob.name == "steps" and knob.applies_to(family):
            assert params.steps == params.canvas_length == 64
        else:
            assert getattr(params, knob.name) == (knob.off if default is None else default)


def test_a_family_refuses_the_sampling_fields_it_does_not_use():
    with pytest.raises(RequestError, match="top_p is not used by llada"):
        resolve_params(FAMILIES_BY_NAME["llada"],
                       SamplingParams(temperature=0.5, top_p=0.9, max_tokens=8))
    dream = resolve_params(FAMILIES_BY_NAME["dream"],
                           SamplingParams(temperature=0.5, top_k=7, top_p=0.9, max_tokens=8))
    assert (dream.top_k, dream.top_p) == (7, 0.9)
