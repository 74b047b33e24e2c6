"""Image requests through vLLM's front doors (vllm_omni/entrypoints/): the IO
processor's parsing and tokenization (no engine), then a real engine
(``LLM.encode`` with ``{"data": ...}``) and a real server (``POST /pooling``
and OpenAI's ``/v1/images/generations`` through the ``openai`` client, with
the three plugins named in ``VLLM_PLUGINS``) on the tiny Qwen-Image. Images
are checked against diffusers' recordings (tests/qwen_image/golden) and
against each other across the front doors."""

import base64
import io
import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points

import numpy as np
import openai
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ASSETS, REPO, Server, start_engine
from vllm_omni.compat import RequestError
from vllm_omni.entrypoints.image_io import (EXTRA_KWARGS, MAX_SEED, PLUGIN_NAME, ImageIOProcessor,
                                            ImageLimits, ImageOutput, ImageRequest,
                                            image_to_uint8, parse_image_request, plugin,
                                            prompt_token_ids, to_pil)

MODEL = str(ASSETS / "qwen-image-tiny")
GOLDEN = REPO / "tests" / "qwen_image" / "golden"
META = json.loads((GOLDEN / "cases.json").read_text())
TENSORS = load_file(GOLDEN / "golden.safetensors")
CASES = {c["id"]: c for c in META["cases"] if c["batch_size"] == 1}
VLLM_PLUGINS = "vllm_omni,vllm_omni_image,vllm_omni_images"


def limits() -> ImageLimits:
    from vllm_omni.models.qwen_image.config import load_qwen_image_config

    return ImageLimits.from_hf_config(load_qwen_image_config(MODEL))


def golden_image(case_id) -> torch.Tensor:
    return TENSORS[f"{case_id}/image"][0].permute(1, 2, 0)  # [H, W, 3], diffusers' "np"


def case_data(case_id, **extra) -> dict:
    c = CASES[case_id]
    data = {"prompt": c["prompt"], "negative_prompt": c["negative_prompt"],
            "height": c["height"], "width": c["width"],
            "num_inference_steps": c["num_inference_steps"],
            "true_cfg_scale": c["true_cfg_scale"], "seed": c["seed"]}
    return {**data, **extra}


def png_pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


# --------------------------------------------------------------- no engine


def test_limits_follow_diffusers():
    lim = limits()
    assert lim.vae_scale_factor == META["vae_scale_factor"] == 4
    assert lim.default_size == 128 * 4 and lim.size_multiple == 8
    assert (lim.max_image_side, lim.max_inference_steps) == (2048, 1000)
    # diffusers' 1-step schedule is NaN under the scheduler's shift_terminal.
    assert lim.min_inference_steps == 2


def test_defaults():
    req = parse_image_request({"prompt": "a cat"}, limits())
    assert req == ImageRequest(prompt="a cat", negative_prompt=None, height=512, width=512,
                               num_inference_steps=50, true_cfg_scale=4.0, seed=None,
                               output="png")
    full = parse_image_request({"prompt": "a", "negative_prompt": "", "height": 2048,
                                "width": 8, "num_inference_steps": 1000, "true_cfg_scale": 0,
                                "seed": MAX_SEED, "output": "tensor"}, limits())
    assert full.negative_prompt == "" and (full.height, full.width) == (2048, 8)
    assert isinstance(full.true_cfg_scale, float) and full.seed == MAX_SEED


BAD = [
    ("a cat", "data", "object"),
    (["a cat"], "data", "object"),
    ({"prompt": "x", "guidance_scale": 3}, "guidance_scale", "allowed fields: prompt, "),
    ({}, "prompt", "required"),
    ({"prompt": ""}, "prompt", "non-empty string"),
    ({"prompt": "   "}, "prompt", "non-empty string"),
    ({"prompt": 5}, "prompt", "non-empty string"),
    ({"prompt": None}, "prompt", "non-empty string"),
    ({"prompt": "x", "negative_prompt": 3}, "negative_prompt", "string or null"),
    ({"prompt": "x", "height": 33}, "height", "multiple of 8"),
    ({"prompt": "x", "height": 4}, "height", "from 8 to 2048"),
    ({"prompt": "x", "height": 0}, "height", "from 8 to 2048"),
    ({"prompt": "x", "width": 2056}, "width", "from 8 to 2048"),
    ({"prompt": "x", "width": "64"}, "width", "integer multiple of 8"),
    ({"prompt": "x", "width": True}, "width", "integer multiple of 8"),
    ({"prompt": "x", "width": 64.0}, "width", "integer multiple of 8"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "from 2 to 1000"),
    ({"prompt": "x", "num_inference_steps": 1}, "num_inference_steps", "shift_terminal"),
    ({"prompt": "x", "num_inference_steps": 1001}, "num_inference_steps", "from 2 to 1000"),
    ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps", "integer"),
    ({"prompt": "x", "num_inference_steps": True}, "num_inference_steps", "integer"),
    ({"prompt": "x", "true_cfg_scale": -1}, "true_cfg_scale", ">= 0"),
    ({"prompt": "x", "true_cfg_scale": "4"}, "true_cfg_scale", "finite number"),
    ({"prompt": "x", "true_cfg_scale": True}, "true_cfg_scale", "finite number"),
    ({"prompt": "x", "true_cfg_scale": math.nan}, "true_cfg_scale", "finite number"),
    ({"prompt": "x", "true_cfg_scale": math.inf}, "true_cfg_scale", "finite number"),
    ({"prompt": "x", "seed": -1}, "seed", f"from 0 to {MAX_SEED}"),
    ({"prompt": "x", "seed": MAX_SEED + 1}, "seed", f"from 0 to {MAX_SEED}"),
    ({"prompt": "x", "seed": 1.5}, "seed", "integer"),
    ({"prompt": "x", "seed": "7"}, "seed", "integer"),
    ({"prompt": "x", "seed": False}, "seed", "integer"),
    ({"prompt": "x", "output": "jpeg"}, "output", "'png', 'tensor'"),
    ({"prompt": "x", "output": None}, "output", "'png', 'tensor'"),
]


@pytest.mark.parametrize("data,field,fragment", BAD, ids=lambda x: repr(x)[:40])
def test_bad_input_names_the_field_and_what_it_allows(data, field, fragment):
    with pytest.raises(RequestError) as info:
        parse_image_request(data, limits())
    assert info.value.parameter == field
    assert fragment in str(info.value)


def test_prompt_ids_are_what_diffusers_tokenizes():
    pytest.importorskip("diffusers")
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer

    from vllm_omni.models.qwen_image.pipeline_math import PROMPT_TEMPLATE
    from vllm_omni.models.qwen_image.pipeline_math import PROMPT_TEMPLATE_DROP as TEMPLATE_DROP

    tok = AutoTokenizer.from_pretrained(f"{MODEL}/tokenizer")
    # The recorded ids of every diffusers case (prompt and, under true CFG, negative).
    for cid, c in CASES.items():
        assert prompt_token_ids(tok, c["prompt"]) == TENSORS[f"{cid}/prompt_input_ids"][0].tolist()
        if f"{cid}/negative_input_ids" in TENSORS:
            assert (prompt_token_ids(tok, c["negative_prompt"])
                    == TENSORS[f"{cid}/negative_input_ids"][0].tolist())
    # A prompt past the limit: cut where diffusers' own pipeline cuts it.
    pipe = QwenImagePipeline.from_pretrained(MODEL, dtype=torch.float32)
    assert PROMPT_TEMPLATE == pipe.prompt_template_encode
    assert TEMPLATE_DROP == pipe.prompt_template_encode_start_idx
    long = " ".join(f"word{i}" for i in range(1500))
    want = pipe.tokenizer([pipe.prompt_template_encode.format(long)], padding=True,
                          truncation=True,
                          max_length=pipe.tokenizer_max_length + TEMPLATE_DROP).input_ids[0]
    got = prompt_token_ids(tok, long)
    assert got == list(want) and len(got) == 1024 + 34


def test_png_is_diffusers_pil_rounding_and_to_pil_reads_every_form():
    from vllm_omni.entrypoints.image_io import encode_png

    g = torch.Generator().manual_seed(0)
    image = torch.rand(24, 16, 3, generator=g)
    image[0, 0] = torch.tensor([0.0, 1.0, 0.5])
    want = (image.numpy() * 255).round().astype("uint8")  # diffusers' numpy_to_pil
    b64 = encode_png(image)
    assert np.array_equal(png_pixels(b64), want)
    out = ImageOutput(data=b64, format="png", height=24, width=16, seed=0)
    for form in (out, b64, image, image.numpy()):
        assert np.array_equal(np.asarray(to_pil(form)), want)
    assert [p.size for p in to_pil([out, image])] == [(16, 24), (16, 24)]
    # A tensor output serializes to nested lists online.
    t = ImageOutput(data=image, format="tensor", height=24, width=16, seed=0)
    assert np.allclose(np.array(json.loads(json.dumps(t.model_dump()))["data"]), image.numpy())


def test_plugin_wiring():
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from vllm_omni.models.qwen_image.config import IO_PROCESSOR, load_qwen_image_config

    assert PLUGIN_NAME == IO_PROCESSOR == load_qwen_image_config(MODEL).io_processor_plugin
    io = {e.name: e for e in entry_points(group="vllm.io_processor_plugins")}
    assert io[PLUGIN_NAME].load()() == plugin()
    assert resolve_obj_by_qualname(plugin()) is ImageIOProcessor
    ep = {e.name: e for e in entry_points(group="vllm.endpoint_plugins")}
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    endpoint = ep["vllm_omni_images"].load()()
    assert isinstance(endpoint, EndpointPlugin) and endpoint.name == "vllm_omni_images"
    general = {e.name for e in entry_points(group="vllm.general_plugins")}
    assert set(VLLM_PLUGINS.split(",")) <= general | set(io) | set(ep)


# --------------------------------------------------------- a real engine


@pytest.fixture(scope="module")
def image_llm():
    llm = start_engine(MODEL, config_format="qwen_image", max_model_len=None)
    yield llm
    del llm


def encode(llm, data):
    (out,) = llm.encode({"data": data}, pooling_task="plugin", use_tqdm=False)
    return out.outputs


def test_offline_tensor_and_png_match_diffusers(image_llm):
    for cid in ("c03_cfg4_neg", "c06_40x56"):  # true CFG with a negative prompt; 40x56
        c = CASES[cid]
        t = encode(image_llm, case_data(cid, output="tensor"))
        assert isinstance(t, ImageOutput) and t.format == "tensor" and t.seed == c["seed"]
        assert t.data.dtype == torch.float32 and t.data.shape == (c["height"], c["width"], 3)
        assert (t.data - golden_image(cid)).abs().max().item() <= 1e-4, cid
        p = encode(image_llm, case_data(cid))  # output defaults to png
        assert p.format == "png" and isinstance(p.data, str)
        assert np.array_equal(png_pixels(p.data), image_to_uint8(t.data))
        assert np.array_equal(np.asarray(to_pil(p)), image_to_uint8(t.data))


def test_offline_drawn_seed_is_reported_and_reproduces(image_llm):
    data = {"prompt": "a red cat", "height": 16, "width": 16, "num_inference_steps": 2,
            "output": "tensor"}
    a = encode(image_llm, data)
    assert 0 <= a.seed <= MAX_SEED
    b = encode(image_llm, {**data, "seed": a.seed})
    assert torch.equal(a.data, b.data)


def test_offline_bad_input_raises_and_engine_goes_on(image_llm):
    with pytest.raises(RequestError) as info:
        encode(image_llm, {"prompt": "x", "height": 30})
    assert info.value.parameter == "height"
    out = encode(image_llm, case_data("c00_base", output="tensor"))
    assert (out.data - golden_image("c00_base")).abs().max().item() <= 1e-4


def processor_of(llm) -> ImageIOProcessor:
    engine = llm.llm_engine
    return ImageIOProcessor(engine.vllm_config, engine.renderer)


def test_pooling_params_contract(image_llm):
    proc = processor_of(image_llm)
    assert proc.limits == limits()  # what the engine's hf_config gives
    tok = proc.tokenizer
    prompt = proc.pre_process(proc.parse_data(case_data("c03_cfg4_neg")))
    params = proc.merge_pooling_params()
    assert prompt == {"prompt_token_ids": TENSORS["c03_cfg4_neg/prompt_input_ids"][0].tolist()}
    assert params.task == "plugin" and tuple(params.extra_kwargs) == EXTRA_KWARGS
    kw = params.extra_kwargs
    assert kw == {"height": 32, "width": 32, "num_inference_steps": 2, "true_cfg_scale": 4.0,
                  "seed": 0, "negative_prompt_token_ids":
                  TENSORS["c03_cfg4_neg/negative_input_ids"][0].tolist()}
    assert type(kw["true_cfg_scale"]) is float
    # No negative prompt: None; no seed: one drawn (63 bits).
    proc.pre_process(proc.parse_data({"prompt": "x", "true_cfg_scale": 2}))
    kw = proc.merge_pooling_params().extra_kwargs
    assert kw["negative_prompt_token_ids"] is None and 0 <= kw["seed"] <= MAX_SEED
    assert kw["true_cfg_scale"] == 2.0 and type(kw["true_cfg_scale"]) is float
    assert (kw["height"], kw["num_inference_steps"]) == (512, 50)
    # Offline, vLLM passes the user's (or default) PoolingParams to merge.
    from vllm.pooling_params import PoolingParams

    proc.pre_process(proc.parse_data({"prompt": "x", "seed": 3}))
    merged = proc.merge_pooling_params(PoolingParams())
    assert merged.task == "plugin" and merged.extra_kwargs["seed"] == 3
    proc.pre_process(proc.parse_data({"prompt": "x"}))
    with pytest.raises(RequestError) as info:
        proc.merge_pooling_params(PoolingParams(extra_kwargs={"seed": 1}))
    assert info.value.parameter == "extra_kwargs"
    # Never params without a pre_process on this thread.
    with pytest.raises(RuntimeError, match="no pre_process"):
        proc.merge_pooling_params()
    assert prompt_token_ids(tok, "x") == proc.pre_process(proc.parse_data({"prompt": "x"}))[
        "prompt_token_ids"]
    proc.merge_pooling_params()


def test_params_do_not_cross_between_requests(image_llm):
    """vLLM calls pre_process then merge_pooling_params() (no argument) for one
    request in one context: a thread of the renderer's pool (vLLM 0.26), the
    request's asyncio task on the event loop (0.27.1). Many requests at once,
    in threads and in interleaved tasks, each get their own params."""
    import asyncio

    proc = processor_of(image_llm)
    barrier = threading.Barrier(8)

    def one(seed):
        proc.pre_process(proc.parse_data({"prompt": f"p{seed}", "seed": seed}),
                         request_id=f"req-{seed}")
        barrier.wait()  # every thread's pre_process ran before any merge
        return proc.merge_pooling_params().extra_kwargs["seed"]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == list(range(8))

    async def task(seed):
        proc.pre_process(proc.parse_data({"prompt": f"p{seed}", "seed": seed}),
                         request_id=f"task-{seed}")
        await asyncio.sleep(0.01 * (8 - seed))  # the others' pre_process runs meanwhile
        return proc.merge_pooling_params().extra_kwargs["seed"]

    async def tasks():
        return await asyncio.gather(*(task(s) for s in range(8)))

    assert asyncio.run(tasks()) == list(range(8))
    for s in range(8):  # what post_process would take
        for prefix in ("req", "task"):
            assert proc._online.pop(f"{prefix}-{s}").seed == s


# --------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def image_server():
    server = Server(MODEL, "--config-format", "qwen_image", "--served-model-name", "qwen-image",
                    "--max-model-len", "1058", "--max-num-seqs", "4",
                    env={"VLLM_PLUGINS": VLLM_PLUGINS})
    yield server
    server.stop()


def pooling(server, data, **body):
    return requests.post(server.url + "/pooling", timeout=120,
                         json={"model": "qwen-image", "data": data, **body})


def test_server_pooling_png_and_tensor(image_server, image_llm):
    r = pooling(image_server, case_data("c07_64x32_cfg"))
    assert r.status_code == 200, r.text
    out = r.json()["data"]
    assert (out["format"], out["height"], out["width"], out["seed"]) == ("png", 64, 32, 42)
    offline = encode(image_llm, case_data("c07_64x32_cfg"))
    assert out["data"] == offline.data  # the same PNG bytes as LLM.encode
    r = pooling(image_server, case_data("c07_64x32_cfg", output="tensor"))
    assert r.status_code == 200, r.text
    image = torch.tensor(r.json()["data"]["data"])
    assert image.shape == (64, 32, 3)
    assert (image - golden_image("c07_64x32_cfg")).abs().max().item() <= 1e-4


def test_server_concurrent_requests_keep_their_own_settings(image_server, image_llm):
    jobs = [{"prompt": "a red cat", "height": 8 * (2 + i % 3), "width": 8 * (2 + i // 3),
             "num_inference_steps": 2 + i % 2, "seed": 100 + i} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda d: pooling(image_server, d), jobs))
    for data, r in zip(jobs, results):
        assert r.status_code == 200, r.text
        got = r.json()["data"]
        assert (got["height"], got["width"], got["seed"]) == (data["height"], data["width"],
                                                               data["seed"])
        assert got["data"] == encode(image_llm, data).data


def test_images_generations_through_the_openai_client(image_server, image_llm):
    client = openai.OpenAI(base_url=image_server.url + "/v1", api_key="none")
    extra = {"negative_prompt": "blurry", "num_inference_steps": 2, "true_cfg_scale": 4.0,
             "seed": 5}
    resp = client.images.generate(model="qwen-image", prompt="a red apple", n=2, size="32x32",
                                  response_format="b64_json", extra_body=extra)
    assert isinstance(resp.created, int) and len(resp.data) == 2
    for i, image in enumerate(resp.data):
        assert png_pixels(image.b64_json).shape == (32, 32, 3)
        # Image i of n is the single request with seed + i.
        want = encode(image_llm, {"prompt": "a red apple", "height": 32, "width": 32,
                                  **extra, "seed": 5 + i})
        assert image.b64_json == want.data
    # Without a seed, each image draws its own.
    resp = client.images.generate(model="qwen-image", prompt="a red apple", n=2, size="16x24",
                                  extra_body={"num_inference_steps": 2})
    assert [png_pixels(d.b64_json).shape for d in resp.data] == [(24, 16, 3)] * 2
    assert resp.data[0].b64_json != resp.data[1].b64_json


IMAGES_BAD = [
    ({"response_format": "url"}, "response_format", "only 'b64_json'"),
    ({"response_format": "png"}, "response_format", "b64_json"),
    ({"size": "33x32"}, "size", "multiple of 8"),
    ({"size": "32x4096"}, "size", "from 8 to 2048"),
    ({"size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"n": 0}, "n", "from 1 to 4"),
    ({"n": 5}, "n", "from 1 to 4"),
    ({"n": "2"}, "n", "from 1 to 4"),
    ({"quality": "hd"}, "quality", "allowed fields"),
    ({"prompt": ""}, "prompt", "non-empty"),
    ({"num_inference_steps": 1}, "num_inference_steps", "from 2 to 1000"),
    ({"true_cfg_scale": -2}, "true_cfg_scale", ">= 0"),
    ({"seed": -3}, "seed", "from 0 to"),
    ({"seed": MAX_SEED, "n": 2}, "seed", "seed + n - 1"),
]


def test_bad_requests_are_400_naming_the_field_and_server_goes_on(image_server):
    url = image_server.url
    for extra, field, fragment in IMAGES_BAD:
        body = {"model": "qwen-image", "prompt": "a cat", "size": "32x32", **extra}
        r = requests.post(url + "/v1/images/generations", json=body, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["param"] == field and fragment in err["message"], (extra, err)
        assert err["code"] == 400 and err["type"] == "BadRequestError"
    r = requests.post(url + "/v1/images/generations", data="{not json", timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = requests.post(url + "/v1/images/generations", json=["a cat"], timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = requests.post(url + "/v1/images/generations", json={"model": "dall-e-3", "prompt": "x"},
                      timeout=60)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    # /pooling validates with the same parser.
    for data, field, fragment in BAD:
        if isinstance(data, dict) and any(isinstance(v, float) and not math.isfinite(v)
                                          for v in data.values()):
            continue  # NaN/inf are not JSON
        r = pooling(image_server, data)
        assert r.status_code == 400, (data, r.text)
        err = r.json()["error"]
        assert err["param"] == field and fragment in err["message"], (data, err)
    # Still serving.
    r = pooling(image_server, {"prompt": "a cat", "height": 16, "width": 16,
                               "num_inference_steps": 2, "seed": 1})
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    assert len(client.images.generate(model="qwen-image", prompt="a cat", size="16x16",
                                      extra_body={"num_inference_steps": 2}).data) == 1
