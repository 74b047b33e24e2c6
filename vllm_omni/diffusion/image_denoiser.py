"""The image denoising loop: every ready image request of an engine step,
from prompt tokens to pixels, as diffusers' ``QwenImagePipeline.__call__``
computes it for each request alone.

Per request (``ImageJob``): its templated prompt (and negative prompt) are
encoded, its noise is drawn from a CPU generator seeded with its seed (as the
pipeline draws it with ``torch.Generator("cpu")``), and its flow-match
schedule follows its own size and step count. Then the requests step
together: each forward packs, for every unfinished request, its conditional
sequence and (with true CFG) its unconditional one as variable-length
sequences (``JointBatch``), so sizes, step counts and guidance settings mix
freely and nothing is padded. After the forward each request combines its
two predictions (norm-rescaled CFG), takes its Euler step, and when its
schedule ends its latents go through the VAE decoder. Requests leave the loop
as they finish; the whole loop runs inside one engine step (vLLM hands an
attention-free pooling model each prompt once), so a request that arrives
meanwhile waits for the next step (``docs/architecture/images.md``).
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vllm_omni.diffusion.flow_match import euler_step, schedule
from vllm_omni.models.qwen_image.pipeline_math import (combine_true_cfg, denormalize_latents,
                                                       image_seq_len, initial_noise,
                                                       latent_size,
                                                       postprocess_image, transformer_timestep,
                                                       unpack_latents)
from vllm_omni.models.qwen_image.transformer import JointBatch


@dataclass(frozen=True)
class ImageParams:
    """A request's knobs, as the IO processor put them in
    ``PoolingParams.extra_kwargs`` (already validated there)."""

    height: int
    width: int
    num_inference_steps: int
    true_cfg_scale: float
    seed: int
    negative_prompt_token_ids: tuple[int, ...] | None = None

    @classmethod
    def from_extra_kwargs(cls, extra: dict) -> "ImageParams":
        neg = extra.get("negative_prompt_token_ids")
        return cls(int(extra["height"]), int(extra["width"]), int(extra["num_inference_steps"]),
                   float(extra["true_cfg_scale"]), int(extra["seed"]),
                   None if neg is None else tuple(neg))

    @property
    def true_cfg(self) -> bool:
        # The pipeline's condition: a scale above 1 and a negative prompt.
        return self.true_cfg_scale > 1 and self.negative_prompt_token_ids is not None


@dataclass
class ImageJob:
    req_id: str
    prompt_token_ids: list[int]
    params: ImageParams
    step: int = 0
    # Set when the loop starts: packed latents [tokens, 4 * channels], the
    # image-token grid (frames, rows, cols), the schedule, the text
    # embeddings (negative ones with true CFG).
    latents: torch.Tensor | None = None
    grid: tuple[int, int, int] = (1, 0, 0)
    timesteps: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    neg_embeds: torch.Tensor | None = None


class ImageDenoiser:
    # When a dict: each request's text embeddings and latents (initial, then
    # after every step) are copied to the CPU under its id, for tests that
    # compare them with diffusers' (set through ``LLM.collective_rpc``).
    trace: dict | None = None
    # True: each phase (text encoder, each denoising step, VAE decode) runs
    # under a profiler range and ends with a device sync, so the ranges'
    # times are the phases' GPU times (benchmarks/image_throughput.py --profile).
    profile_phases = False

    def __init__(self, model, device: torch.device, tokens_per_forward: int):
        self.model = model
        self.device = device
        # Bounds a forward's activations: jobs are decoded in groups whose
        # sequences add up to at most this many tokens (a larger job alone).
        self.tokens_per_forward = tokens_per_forward
        self.dtype = model.transformer.img_in.weight.dtype
        self.vsf = model.vae_scale_factor
        self.channels = model.transformer.cfg.in_channels // 4

    def run(self, jobs: list[ImageJob]) -> dict[str, torch.Tensor]:
        """Each job's image: float32 [height, width, 3] in [0, 1], on the CPU."""
        images = {}
        for group in self._groups(jobs):
            with self._phase("qwen_image.text_encoder"):
                self._start(group)
            active = list(group)
            while active:
                with self._phase("qwen_image.denoise_step"):
                    self._step(active)
                for job in active:
                    if job.step == job.params.num_inference_steps:
                        with self._phase("qwen_image.vae_decode"):
                            images[job.req_id] = self._decode(job)
                active = [j for j in active if j.step < j.params.num_inference_steps]
        return images

    def profile(self, max_num_seqs: int, max_side: int, max_prompt_tokens: int,
                steps: int) -> int:
        """The largest activations serving can reach, run once (the runner's
        ``profile_run``, so vLLM's memory profile sees them): ``max_num_seqs``
        requests at the largest image, with true CFG and both prompts at the
        longest; their first forward group (the largest group ``_groups`` can
        form), its prompts encoded together and one denoising step; one VAE
        decode of the largest image (images are decoded one at a time).
        Returns the forward's tokens."""
        ids = [0] * max_prompt_tokens
        params = ImageParams(max_side, max_side, steps, 4.0, 0, tuple(ids))
        jobs = [ImageJob(f"profile-{i}", ids, params) for i in range(max_num_seqs)]
        group = self._groups(jobs)[0]
        self._start(group)
        self._step(group)
        self._decode(group[0])
        return sum(2 * len(j.latents) + len(j.embeds) + len(j.neg_embeds) for j in group)

    @contextmanager
    def _phase(self, name: str):
        if not self.profile_phases:
            yield
            return
        with torch.profiler.record_function(name):
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def _groups(self, jobs: list[ImageJob]) -> list[list[ImageJob]]:
        """Jobs in arrival order, cut where a forward would pass the budget."""
        groups, tokens = [], 0
        for job in jobs:
            p = job.params
            # At most: the image per branch plus both prompts whole.
            image = image_seq_len(p.height, p.width, self.vsf)
            cost = image + len(job.prompt_token_ids)
            if p.true_cfg:
                cost += image + len(p.negative_prompt_token_ids)
            if not groups or tokens + cost > self.tokens_per_forward:
                groups.append([])
                tokens = 0
            groups[-1].append(job)
            tokens += cost
        return groups

    def _start(self, jobs: list[ImageJob]) -> None:
        prompts = [j.prompt_token_ids for j in jobs]
        prompts += [list(j.params.negative_prompt_token_ids) for j in jobs if j.params.true_cfg]
        embeds = self.model.text_encoder.encode(prompts, self.device)
        negatives = iter(embeds[len(jobs):])
        for job, emb in zip(jobs, embeds):
            p = job.params
            job.embeds = emb.to(self.dtype)
            job.neg_embeds = next(negatives).to(self.dtype) if p.true_cfg else None
            generator = torch.Generator("cpu").manual_seed(p.seed)
            job.latents = initial_noise(generator, self.channels, p.height, p.width, self.vsf,
                                        self.dtype, self.device)[0]
            h, w = latent_size(p.height, p.width, self.vsf)
            job.grid = (1, h // 2, w // 2)  # 2x2 latent patches per image token
            job.timesteps, job.sigmas = schedule(
                self.model.scheduler_config, p.num_inference_steps,
                image_seq_len(p.height, p.width, self.vsf), device=self.device)
            job.step = 0
            self._record(job, embeds=job.embeds, neg_embeds=job.neg_embeds, latents=job.latents)

    def _step(self, jobs: list[ImageJob]) -> None:
        """One forward for every job's sequences, then each job's step."""
        img, txt, times, txt_lens, shapes = [], [], [], [], []
        for job in jobs:
            t = transformer_timestep(job.timesteps[job.step : job.step + 1], self.dtype)
            for emb in (job.embeds, job.neg_embeds):
                if emb is None:
                    continue
                img.append(job.latents)
                txt.append(emb)
                times.append(t)
                txt_lens.append(len(emb))
                shapes.append(job.grid)
        out = self.model.transformer(torch.cat(img), torch.cat(txt), torch.cat(times),
                                     JointBatch(tuple(txt_lens), tuple(shapes)))
        preds = iter(out.split([len(x) for x in img]))
        for job in jobs:
            pred = next(preds)
            if job.neg_embeds is not None:
                pred = combine_true_cfg(pred, next(preds), job.params.true_cfg_scale)
            i = job.step
            job.latents = euler_step(job.latents, pred, job.sigmas[i], job.sigmas[i + 1])
            job.step += 1
            self._record(job, latents=job.latents)

    def _record(self, job: ImageJob, **tensors) -> None:
        if self.trace is None:
            return
        entry = self.trace.setdefault(job.req_id, {})
        for name, value in tensors.items():
            if value is not None:
                entry.setdefault(name, []).append(value.detach().cpu().clone())

    def _decode(self, job: ImageJob) -> torch.Tensor:
        p = job.params
        latents = unpack_latents(job.latents[None], p.height, p.width, self.vsf)
        vae_dtype = next(self.model.vae.parameters()).dtype
        z = denormalize_latents(latents, self.model.latents_mean, self.model.latents_std,
                                vae_dtype)
        image = self.model.vae.decode(z)[:, :, 0]
        return postprocess_image(image, "pt")[0].permute(1, 2, 0).float().cpu()
