"""Load JetAstra/SDAR's official code (unmodified, from --ref) on CPU, with plain-PyTorch stand-ins.

Used by record_golden.py only (not a test). The official files are copied as they are into a temporary
package; next to them go the stand-ins for what cannot run on CPU:

- `flash_attn.ops.triton.layer_norm.rms_norm_fn` (hard import; every RMSNorm calls it): RMSNorm computed
  in float32 (float64 for a float64 model), `weight * x * rsqrt(mean(x^2) + eps)`, cast back to x's dtype.
- `flash_attn.flash_attn_func` (called in eval mode whenever the attention mask is all ones, i.e. every
  decode step and a one-block prefill): non-causal GQA softmax attention, [b, l, h, d] layout, query head i
  reads KV head i // (h / h_kv), softmax in float32 (float64 for a float64 model).
- `fused_linear_diffusion_cross_entropy` (imported by modeling_sdar.py; training loss only, needs Triton):
  an empty class of the same name, never called at inference.
"""
import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile

PKG = "sdar_official"

FLASH_INIT = '''
import torch

def _acc(dtype):
    return torch.promote_types(dtype, torch.float32)

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """Stand-in: non-causal GQA softmax attention. q [b, lq, h, d], k/v [b, lk, hkv, d]."""
    assert not causal and dropout_p == 0.0
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(h // hkv, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(h // hkv, dim=1)
    acc = _acc(q.dtype)
    s = torch.matmul(qh.to(acc), kh.to(acc).transpose(-1, -2)) * scale
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, vh.to(acc))
    return o.transpose(1, 2).to(q.dtype).contiguous()

def flash_attn_varlen_func(*a, **k):
    raise NotImplementedError("stand-in: not used at inference")
'''

BERT_PADDING = '''
def index_first_axis(*a, **k):
    raise NotImplementedError("stand-in")

def pad_input(*a, **k):
    raise NotImplementedError("stand-in")

def unpad_input(*a, **k):
    raise NotImplementedError("stand-in")
'''

LAYER_NORM = '''
import torch

def rms_norm_fn(x, weight, bias=None, residual=None, eps=1e-6, **kwargs):
    """Stand-in for flash-attn's Triton RMSNorm: computed in float32 (float64 for float64 input)."""
    assert bias is None and residual is None
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    return y.to(x.dtype)
'''

FUSED_CE = '''
class FusedLinearDiffusionCrossEntropyLoss:
    """Stand-in: the official module needs Triton and is used only by the training loss."""
    def __init__(self, *a, **k):
        raise NotImplementedError("stand-in: training only")
'''

OFFICIAL_FILES = ["generate.py", "SDAR-4B-Chat/modeling_sdar.py", "SDAR-4B-Chat/configuration_sdar.py"]


def git_blob_sha(path):
    data = open(path, "rb").read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def load_reference(ref_dir):
    """Returns (generate_module, modeling_module, configuration_module, {file: git blob sha})."""
    tmp = tempfile.mkdtemp(prefix="sdar-standins-")
    pkg = os.path.join(tmp, PKG)
    os.makedirs(pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    for f in ("modeling_sdar.py", "configuration_sdar.py"):
        shutil.copyfile(os.path.join(ref_dir, "SDAR-4B-Chat", f), os.path.join(pkg, f))
    with open(os.path.join(pkg, "fused_linear_diffusion_cross_entropy.py"), "w") as fh:
        fh.write(FUSED_CE)
    fa = os.path.join(tmp, "flash_attn")
    os.makedirs(os.path.join(fa, "ops", "triton"))
    files = {"__init__.py": FLASH_INIT, "bert_padding.py": BERT_PADDING, "ops/__init__.py": "",
             "ops/triton/__init__.py": "", "ops/triton/layer_norm.py": LAYER_NORM}
    for name, text in files.items():
        with open(os.path.join(fa, name), "w") as fh:
            fh.write(text)
    sys.path.insert(0, tmp)
    configuration = importlib.import_module(PKG + ".configuration_sdar")
    modeling = importlib.import_module(PKG + ".modeling_sdar")
    spec = importlib.util.spec_from_file_location("sdar_generate", os.path.join(ref_dir, "generate.py"))
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    shas = {f: git_blob_sha(os.path.join(ref_dir, f)) for f in OFFICIAL_FILES}
    return generate, modeling, configuration, shas
