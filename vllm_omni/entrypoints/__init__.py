"""Front doors for image models (Qwen-Image) through vLLM's own entry points.

- ``image_io``: the IO processor plugin (``vllm.io_processor_plugins``, name
  ``vllm_omni_image``) behind ``LLM.encode({"data": {...}}, pooling_task="plugin")``
  and the server's ``POST /pooling``; it also holds the request parsing every
  front door shares.
- ``images_api``: an endpoint plugin (``vllm.endpoint_plugins``, name
  ``vllm_omni_images``) adding OpenAI's ``POST /v1/images/generations`` to
  vLLM's server.
"""
