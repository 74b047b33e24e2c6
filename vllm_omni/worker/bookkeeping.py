"""A request's committed block, recorded where vLLM records a step's sampled
tokens in ``_bookkeeping_sync`` (why and what: ``docs/architecture/overview.md``,
"Bookkeeping"; the fields are the same in vLLM 0.26 and 0.27.1,
``vllm_omni/compat.py``)."""


def commit_block(input_batch, req_index: int, state, block: list[int]) -> list[int]:
    """Append ``block`` to the request at row ``req_index``; returns what was
    appended. Tokens past ``max_tokens`` or ``max_model_len`` (the canvas is
    whole blocks) are left out: the scheduler would drop them at once, and
    vLLM's row holds at most ``max_model_len`` tokens."""
    start = int(input_batch.num_tokens_no_spec[req_index])
    room = input_batch.token_ids_cpu.shape[1] - start
    if state.sampling_params is not None and state.sampling_params.max_tokens is not None:
        room = min(room, state.sampling_params.max_tokens - len(state.output_token_ids))
    block = block[:max(room, 0)]
    if not block:
        return block
    end = start + len(block)
    input_batch.token_ids_cpu[req_index, start:end] = block
    input_batch.is_token_ids[req_index, start:end] = True
    input_batch.num_tokens_no_spec[req_index] = end
    state.output_token_ids.extend(block)
    return block
