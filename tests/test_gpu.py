"""The core on CUDA: bitsandbytes' GPU kernels, bf16 compute. Skipped without CUDA."""

import pytest
import torch

from sdlora.mixing import Mix, Mixer
from tests.core_helpers import adapted

pytestmark = pytest.mark.gpu


def test_cuda_bf16_mix_matches_fp32_cpu():
    """The same adapted model (LoRA, DoRA, VeRA) in bf16 on CUDA, a per-sample mix of a guidance-doubled batch,
    against fp32 on the CPU. (Before: an fp32 model fed bf16 input, which CUDA refuses.)"""
    import copy

    cpu_model, _ = adapted("linear", None, {"a": "lora", "b": "dora", "c": "vera"})
    x = torch.randn(4, 32)
    mix = Mix({"a": 1.0, "b": 0.5, "c": 0.7})
    with torch.no_grad(), Mixer({"unet": cpu_model}).apply(mix, mode="unfused"):
        ref = cpu_model(x)
    gpu_model = copy.deepcopy(cpu_model).cuda().to(torch.bfloat16)
    with torch.no_grad(), Mixer({"unet": gpu_model}).apply([mix, mix]):  # 2 mixes, batch 4: [uncond; cond]
        out = gpu_model(x.cuda().bfloat16()).float().cpu()
    assert ((out - ref).norm() / ref.norm()) < 0.02


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_cuda_quantized(quant):
    from sdlora.quant import quantize_model
    from tests.core_helpers import mlp

    ref = mlp().cuda()
    model = mlp()
    report = quantize_model(model, quant, device="cuda", compute_dtype=torch.bfloat16)
    assert report.linear == 2
    x = torch.randn(4, 32, device="cuda")
    with torch.no_grad():
        err = (model(x.bfloat16()).float() - ref(x)).norm() / ref(x).norm()
    assert err < 0.2
