"""What RL rollout frameworks call between training steps, on a real engine:
new weights through vLLM's ``reload_weights`` (CPU and CUDA), and on CUDA
sleep (levels 1 and 2) and wake-up: the engine's device memory falls to near
zero while asleep (the denoiser's key arena and CUDA graphs included) and the
outputs after waking are token-identical."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ASSETS, generate_llada_cases, golden_cases, start_engine

GiB = 1 << 30
# What a sleeping engine process may still hold on the device: its CUDA
# context with the kernels it loaded, library workspaces and vLLM's own
# bookkeeping tensors (2.5-2.7 GiB seen on an H200 with this test's engine,
# 1.3-1.5 GiB with the 8B one of benchmarks/sleep_memory.py).
ASLEEP_MAX_BYTES = 3 * GiB


@pytest.fixture(scope="module")
def cases():
    # Every cache mode: exact, prefix and dual cache, with and without threshold.
    return golden_cases("llada_cases.json")["cases"]


@pytest.fixture(scope="module")
def flipped_checkpoint(tmp_path_factory):
    """llada-tiny with its LM head negated: the same format, other outputs."""
    path = tmp_path_factory.mktemp("llada-tiny-flipped")
    shutil.copytree(ASSETS / "llada-tiny", path, dirs_exist_ok=True)
    weights = load_file(path / "model.safetensors")
    weights["model.transformer.ff_out.weight"] = -weights["model.transformer.ff_out.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def reload(llm, path) -> None:
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})


def device_bytes_in_use() -> int:
    """Device memory in use, as the driver sees it (every process)."""
    free, total = torch.cuda.mem_get_info()
    return total - free


def test_reload_weights_switches_checkpoints_exactly(cases, flipped_checkpoint):
    cuda = torch.cuda.is_available()
    before = device_bytes_in_use() if cuda else 0
    llm = start_engine(str(flipped_checkpoint), enable_sleep_mode=cuda)
    try:
        flipped = generate_llada_cases(llm, cases)
        golden = [c["output_ids"] for c in cases]
        assert all(f != g for f, g in zip(flipped, golden))
        reload(llm, ASSETS / "llada-tiny")
        assert generate_llada_cases(llm, cases) == golden
        reload(llm, flipped_checkpoint)
        assert generate_llada_cases(llm, cases) == flipped
        if cuda:
            sleep_and_wake(llm, cases, flipped, flipped_checkpoint, before)
    finally:
        del llm


def sleep_and_wake(llm, cases, flipped, checkpoint, before: int):
    """Levels 1 and 2 on an engine that has run every cache mode (its key
    arena and CUDA graphs exist); ``before``: bytes in use before it started."""
    awake = device_bytes_in_use() - before
    llm.sleep(level=1)
    asleep_1 = device_bytes_in_use() - before
    llm.wake_up()
    assert generate_llada_cases(llm, cases) == flipped  # weights came back from the host
    llm.sleep(level=2)
    asleep_2 = device_bytes_in_use() - before
    llm.wake_up()
    reload(llm, checkpoint)  # level 2 discarded the weights
    assert generate_llada_cases(llm, cases) == flipped
    print(f"engine device memory: awake {awake / GiB:.2f} GiB, asleep level 1 "
          f"{asleep_1 / GiB:.2f} GiB, level 2 {asleep_2 / GiB:.2f} GiB")
    assert awake > 4 * ASLEEP_MAX_BYTES
    assert asleep_1 < ASLEEP_MAX_BYTES and asleep_2 < ASLEEP_MAX_BYTES
