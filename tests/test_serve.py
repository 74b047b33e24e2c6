"""The OpenAI server (vLLM's own, with --worker-cls) on the tiny models:
completions and chat, streaming and not, knobs through vllm_xargs, 400s for
bad input, and a storm of concurrent clients with mid-stream disconnects."""

import asyncio
import json

import openai
import pytest
import requests

from conftest import ASSETS, Server, golden_cases


@pytest.fixture(scope="module")
def llada_server():
    server = Server(str(ASSETS / "llada-tiny"), "--served-model-name", "llada",
                    "--additional-config", json.dumps({"diffusion": {"block_length": 8}}))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dream_server():
    server = Server(str(ASSETS / "dream-tiny"), "--served-model-name", "dream")
    yield server
    server.stop()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


def llada_case(name):
    return next(c for c in golden_cases("llada_cases.json")["cases"] if c["name"] == name)


def test_completion_matches_golden_and_llm_path(llada_server, llada_llm):
    case = llada_case("exact_semi_ar")
    knobs = {"steps": case["steps"], "block_length": case["block_length"]}
    out = client(llada_server).completions.create(
        model="llada", prompt=case["prompt_ids"], max_tokens=case["gen_length"], temperature=0,
        extra_body={"vllm_xargs": knobs, "ignore_eos": True, "return_token_ids": True})
    choice = out.choices[0]
    assert choice.token_ids == case["output_ids"]
    assert out.usage.completion_tokens == case["gen_length"]
    assert out.usage.prompt_tokens == len(case["prompt_ids"])
    from vllm import SamplingParams

    ref = llada_llm.generate([{"prompt_token_ids": case["prompt_ids"]}],
                             SamplingParams(temperature=0, max_tokens=case["gen_length"],
                                            ignore_eos=True, extra_args=knobs), use_tqdm=False)
    assert choice.text == ref[0].outputs[0].text


def test_chat_applies_the_template_and_matches_golden(llada_server):
    case = llada_case("exact_semi_ar")
    assert case["prompt"]["chat"]
    out = client(llada_server).chat.completions.create(
        model="llada", messages=[{"role": "user", "content": case["prompt"]["text"]}],
        max_tokens=case["gen_length"], temperature=0,
        extra_body={"vllm_xargs": {"steps": case["steps"]}, "ignore_eos": True,
                    "return_token_ids": True})
    assert out.choices[0].message.content is not None
    assert out.prompt_token_ids == case["prompt_ids"]
    assert out.choices[0].token_ids == case["output_ids"]


def test_streaming_arrives_block_by_block(llada_server):
    case = llada_case("exact_long")  # 64 tokens in blocks of 16
    stream = client(llada_server).completions.create(
        model="llada", prompt=case["prompt_ids"], max_tokens=64, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"vllm_xargs": {"steps": 32, "block_length": 16}, "ignore_eos": True,
                    "return_token_ids": True})
    chunks, usage = [], None
    for chunk in stream:
        if chunk.choices:
            chunks.append(chunk.choices[0].token_ids or [])
        if chunk.usage:
            usage = chunk.usage
    sizes = [len(c) for c in chunks if c]
    assert sizes == [16, 16, 16, 16]
    assert sum(chunks, []) == case["output_ids"]
    assert usage.completion_tokens == 64


def test_engine_default_block_length(llada_server):
    # --additional-config sets block 8: with 16 steps over 32 tokens this is
    # exact_semi_ar.
    case = llada_case("exact_semi_ar")
    out = client(llada_server).completions.create(
        model="llada", prompt=case["prompt_ids"], max_tokens=32, temperature=0,
        extra_body={"vllm_xargs": {"steps": 16}, "ignore_eos": True, "return_token_ids": True})
    assert out.choices[0].token_ids == case["output_ids"]


def test_n_sampled_choices(llada_server):
    out = client(llada_server).completions.create(
        model="llada", prompt="Copyright", max_tokens=16, temperature=1.0, n=3, seed=5,
        extra_body={"vllm_xargs": {"steps": 8}, "ignore_eos": True, "return_token_ids": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert all(len(c.token_ids) == 16 for c in out.choices)
    assert out.usage.completion_tokens == 48


def test_stop_string_cuts_the_text(llada_server):
    case = llada_case("exact_semi_ar")
    full = client(llada_server).completions.create(
        model="llada", prompt=case["prompt_ids"], max_tokens=32, temperature=0,
        extra_body={"vllm_xargs": {"steps": 16}, "ignore_eos": True}).choices[0].text
    stop = full.split()[2]
    out = client(llada_server).completions.create(
        model="llada", prompt=case["prompt_ids"], max_tokens=32, temperature=0, stop=[stop],
        extra_body={"vllm_xargs": {"steps": 16}, "ignore_eos": True})
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full[: full.index(stop)]


def test_seeded_sampling_over_http(dream_server):
    body = dict(model="dream", prompt="Everyone is permitted", max_tokens=16, temperature=0.8,
                seed=11, extra_body={"vllm_xargs": {"steps": 8}})
    a = client(dream_server).completions.create(**body).choices[0].text
    b = client(dream_server).completions.create(**body).choices[0].text
    assert a == b


def test_dream_golden_over_http(dream_server):
    case = golden_cases("dream_cases.json")["cases"][0]
    out = client(dream_server).completions.create(
        model="dream", prompt=case["prompt_ids"], max_tokens=case["max_new_tokens"], temperature=0,
        extra_body={"vllm_xargs": {"algorithm": case["alg"], "steps": case["steps"],
                                   "top_k": case["top_k"]},
                    "ignore_eos": True, "return_token_ids": True})
    assert out.choices[0].token_ids == case["output_ids"]


BAD = [
    ({"vllm_xargs": {"stepz": 3}}, "stepz"),
    ({"vllm_xargs": {"steps": "many"}}, "steps"),
    ({"vllm_xargs": {"steps": 5, "block_length": 8}}, "multiple of the number of blocks"),
    ({"vllm_xargs": {"threshold": 2}}, "threshold"),
    ({"vllm_xargs": {"block_length": 64}}, "block_length"),
    ({"logprobs": 2}, "logprobs"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_is_400_naming_the_problem(llada_server, extra, message):
    body = {"model": "llada", "prompt": "Copyright", "max_tokens": 32, "temperature": 0}
    for k, v in extra.items():
        body[k] = v
    r = requests.post(llada_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_prompt_too_long_and_empty_prompt_are_400(llada_server):
    for prompt in (list(range(5, 600)), ""):
        r = requests.post(llada_server.url + "/v1/completions", timeout=60,
                          json={"model": "llada", "prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 400, (len(prompt), r.text)


def _metric(server, name):
    text = requests.get(server.url + "/metrics", timeout=10).text
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    assert values, name
    return sum(values)


def test_storm_of_64_clients_with_disconnects(llada_server, llada_llm):
    from vllm import SamplingParams

    prompts = ["Copyright", "The licenses for most software are designed to",
               "Everyone is permitted to copy", "This License applies to"]
    settings = [{"steps": 32, "block_length": 8}, {"steps": 16, "block_length": 8},
                {"steps": 8, "block_length": 16, "threshold": 0.5}, {"block_length": 32}]
    jobs = [(prompts[i % 4], settings[(i // 4) % 4], i % 4 == 3) for i in range(64)]
    expected = {}
    for prompt, knobs, _ in jobs:
        key = (prompt, json.dumps(knobs, sort_keys=True))
        if key not in expected:
            out = llada_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=32,
                                     ignore_eos=True, extra_args=knobs), use_tqdm=False)
            expected[key] = out[0].outputs[0].text

    aclient = openai.AsyncOpenAI(base_url=llada_server.url + "/v1", api_key="none")

    async def one(prompt, knobs, disconnect):
        body = dict(model="llada", prompt=prompt, max_tokens=32, temperature=0,
                    extra_body={"vllm_xargs": knobs, "ignore_eos": True})
        if not disconnect:
            out = await aclient.completions.create(**body)
            return out.choices[0].text
        stream = await aclient.completions.create(stream=True, **body)
        async for _ in stream:
            break  # the first block arrived: hang up
        await stream.close()
        return None

    async def storm():
        return await asyncio.gather(*(one(*job) for job in jobs))

    results = asyncio.run(storm())
    for (prompt, knobs, disconnect), text in zip(jobs, results):
        if not disconnect:
            assert text == expected[(prompt, json.dumps(knobs, sort_keys=True))]

    import time

    deadline = time.time() + 30
    while time.time() < deadline and _metric(llada_server, "vllm:num_requests_running") > 0:
        time.sleep(0.5)
    assert _metric(llada_server, "vllm:num_requests_running") == 0
    assert _metric(llada_server, "vllm:kv_cache_usage_perc") == 0
    after = client(llada_server).completions.create(
        model="llada", prompt=prompts[1], max_tokens=32, temperature=0,
        extra_body={"vllm_xargs": settings[0], "ignore_eos": True})
    assert after.choices[0].text == expected[(prompts[1], json.dumps(settings[0], sort_keys=True))]
