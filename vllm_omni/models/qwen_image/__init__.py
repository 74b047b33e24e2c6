"""Qwen-Image (diffusers QwenImagePipeline) ported to run inside vLLM's model runner."""
