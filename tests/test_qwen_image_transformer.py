"""Our Qwen-Image MMDiT (``models/qwen_image/transformer.py``) against diffusers'
``QwenImageTransformer2DModel`` with the same random weights, float32 on CPU:
several requests of different image sizes, text lengths and timesteps packed
into one forward give what diffusers gives for each alone."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

# diffusers' own test sizes (tests/pipelines/qwenimage/test_qwenimage.py).
TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))


def build_pair(seed: int = 0):
    from vllm_omni.models.qwen_image.transformer import QwenImageDiTConfig, QwenImageTransformer

    torch.manual_seed(seed)
    ref = diffusers.QwenImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():  # diffusers zero-initialises some layers: make every weight count
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ours = QwenImageTransformer(QwenImageDiTConfig.from_dict(dict(ref.config)))
    loaded = ours.load_weights(ref.state_dict().items())
    assert loaded == set(dict(ours.named_parameters())), "every parameter comes from diffusers"
    for module in ours.modules():  # what vLLM's loader does after loading
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
    return ref, ours


def test_packed_requests_match_diffusers_one_at_a_time(single_rank):
    from vllm_omni.models.qwen_image.transformer import JointBatch

    ref, ours = build_pair()
    # (text tokens, (frames, rows, cols) patches): odd and even grids, wide and tall.
    seqs = [(5, (1, 4, 6)), (9, (1, 6, 4)), (3, (1, 2, 2)), (7, (1, 3, 5))]
    timesteps = torch.rand(len(seqs))
    imgs = [torch.randn(f * h * w, TINY["in_channels"]) for _, (f, h, w) in seqs]
    txts = [torch.randn(n, TINY["joint_attention_dim"]) for n, _ in seqs]
    batch = JointBatch(tuple(n for n, _ in seqs), tuple(shape for _, shape in seqs))
    with torch.no_grad():
        got = ours(torch.cat(imgs), torch.cat(txts), timesteps, batch)
        want = torch.cat([
            ref(hidden_states=img[None], encoder_hidden_states=txt[None], timestep=t[None],
                img_shapes=[[shape]], return_dict=False)[0][0]
            for img, txt, t, (_, shape) in zip(imgs, txts, timesteps, seqs)])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The same requests in another order: each sequence's output is its own.
    order = [2, 0, 3, 1]
    with torch.no_grad():
        shuffled = ours(torch.cat([imgs[i] for i in order]), torch.cat([txts[i] for i in order]),
                        timesteps[order], JointBatch(tuple(batch.txt_lens[i] for i in order),
                                                     tuple(batch.img_shapes[i] for i in order)))
    starts = torch.tensor([0, *batch.img_lens]).cumsum(0)
    rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order])
    torch.testing.assert_close(shuffled, got[rows], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("field", ["zero_cond_t", "use_additional_t_cond", "use_layer3d_rope",
                                   "guidance_embeds"])
def test_unsupported_variants_are_refused_by_name(field):
    from vllm_omni.models.qwen_image.transformer import QwenImageDiTConfig

    with pytest.raises(ValueError, match=field):
        QwenImageDiTConfig.from_dict({**TINY, field: True})
