"""v-prediction and zero terminal SNR: the training schedule, the loss weights, a CLI run, what the files say,
and generation on such a base (trailing timesteps, guidance rescale) against diffusers' own pipeline."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdlora.adapter_io import read_adapter_file
from sdlora.pipelines import load_base, make_scheduler, training_scheduler
from sdlora.training.loss import loss_weights
from tests.test_training_data import STYLES


@pytest.fixture(scope="module")
def tiny_sd2_ztsnr_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_sd2_v

    return build_tiny_sd2_v(tmp_path_factory.mktemp("tiny-sd2-ztsnr"), zero_terminal_snr=True)


def test_zero_terminal_snr_rescales_the_betas_as_diffusers_does_and_the_weights_stay_finite(embedded):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    plain = training_scheduler(embedded)
    zt = training_scheduler(embedded, "v_prediction", zero_terminal_snr=True)
    assert plain.config.prediction_type == "epsilon" and zt.config.prediction_type == "v_prediction"
    assert plain.alphas_cumprod[-1] > 0 and zt.alphas_cumprod[-1] == 0
    torch.testing.assert_close(zt.betas, rescale_zero_terminal_snr(plain.betas), atol=0, rtol=0)
    t = torch.tensor([0, 500, 999])
    for scheduler in (zt, training_scheduler(embedded, "epsilon", zero_terminal_snr=True)):
        w = loss_weights(scheduler, t, 5.0)
        assert torch.isfinite(w).all() and w[-1] == 0 and (w[:2] > 0).all()
    # v: min(snr, gamma) / (snr + 1), the SNR+1 denominator
    snr = zt.alphas_cumprod[500] / (1 - zt.alphas_cumprod[500])
    assert loss_weights(zt, t, 5.0)[1].item() == pytest.approx((min(snr, 5.0) / (snr + 1)).item(), rel=1e-6)


@pytest.mark.slow
def test_a_v_prediction_zero_terminal_snr_run_says_so_in_its_files(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sdlora", "train", str(STYLES / "dots"), "--out", str(out), "--steps", "8", "--rank",
           "4", "--prediction-type", "v_prediction", "--zero-terminal-snr", "--quiet", "--validation-split", "0"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    af = read_adapter_file(out / "adapter.safetensors")
    assert af.training["prediction_type"] == "v_prediction" and af.training["zero_terminal_snr"] is True
    assert np.isfinite(af.training["final_loss"])
    export = tmp_path / "kohya.safetensors"
    subprocess.run([sys.executable, "-m", "sdlora", "export", str(out / "adapter.safetensors"), "--format", "kohya",
                    "--out", str(export)], check=True, capture_output=True, timeout=600)
    from safetensors import safe_open

    with safe_open(str(export), "pt") as f:
        meta = f.metadata()
    assert meta["ss_v_parameterization"] == "True" and meta["modelspec.prediction_type"] == "v"
    assert json.loads(meta["sdlora_training"])["zero_terminal_snr"] is True
    # baked into the (epsilon) embedded base, the folder's scheduler says what the adapter was trained for
    baked = tmp_path / "baked"
    subprocess.run([sys.executable, "-m", "sdlora", "bake", f"{out / 'adapter.safetensors'}:1", "--out", str(baked)],
                   check=True, capture_output=True, timeout=600)
    config = json.loads((baked / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"] is True
    assert config["timestep_spacing"] == "trailing" and load_base(str(baked)).family == "sd1"


def test_generation_on_a_zero_terminal_snr_base_starts_at_the_last_timestep_and_rescales_guidance(tiny_sd2_ztsnr_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from sdlora.generate import GenerateSettings, generate

    base = load_base(str(tiny_sd2_ztsnr_dir))
    sampler = make_scheduler("euler", base.pipe.scheduler.config)
    sampler.set_timesteps(10)
    assert sampler.config.timestep_spacing == "trailing" and int(sampler.timesteps[0]) == 999
    from sdlora.errors import SdloraError

    with pytest.raises(SdloraError, match="scheduler 'pndm' cannot sample a zero-terminal-SNR base"):
        make_scheduler("pndm", base.pipe.scheduler.config)  # it would drop the rescaled betas silently
    settings = GenerateSettings(prompts=("a red circle",), steps=6, seed=2, guidance=7.0, guidance_rescale=0.7)
    ours = np.asarray(generate(base, settings, progress=False)[0].image)
    plain = np.asarray(generate(base, GenerateSettings(prompts=("a red circle",), steps=6, seed=2, guidance=7.0),
                                progress=False)[0].image)
    assert not np.array_equal(ours, plain)
    # diffusers' pipeline, called as its docs say for such a base, on the same starting noise
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd2_ztsnr_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    unet = pipe.unet
    side = unet.config.sample_size
    latents = torch.randn((1, unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(2))
    theirs = pipe("a red circle", num_inference_steps=6, guidance_scale=7.0, guidance_rescale=0.7, latents=latents,
                  generator=torch.Generator().manual_seed(2), output_type="np").images[0]
    theirs = (theirs * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
