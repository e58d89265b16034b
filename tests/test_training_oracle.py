"""Our training objective against diffusers' training scripts, on tiny pipelines built from configs: for one
fixed batch, noise and timesteps, the loss and the adapter's gradients must equal what the scripts compute.

The scripts' side is rebuilt here from the diffusers API calls they make (diffusers 0.42, the version in
requirements/lock.txt), with a PEFT LoRA holding our adapter's weights, as the scripts train with:
- SDXL: examples/dreambooth/train_dreambooth_lora_sdxl.py: `tokenize_prompt` and `encode_prompt` (each
  encoder's hidden_states[-2], concatenated; the last encoder's pooled output), `compute_time_ids`
  (original_size + crops_coords_top_left + target_size), the UNet call with added_cond_kwargs, and the
  min-SNR loss (`compute_snr`; min(snr, gamma) / snr for epsilon).
- v-prediction: examples/text_to_image/train_text_to_image_lora.py: `text_encoder(input_ids)[0]`,
  `noise_scheduler.get_velocity` as the target, min(snr, gamma) / (snr + 1) weights.
"""

import pytest
import torch
import torch.nn.functional as F

from sdlora.adapters import AdapterConfig
from sdlora.inject import adapter_layers
from sdlora.mixing import Mix
from sdlora.pipelines import load_base, training_scheduler
from sdlora.training.data import sdxl_time_ids
from sdlora.training.loss import training_loss
from sdlora.training.text_cache import TextEmbeddings, unet_conditioning
from tests.core_helpers import randomize

CAPTIONS = ["a red circle, zdots", "a blue square on a yellow background"]
TIMESTEPS = torch.tensor([117, 803])
GAMMA = 5.0
ATTN = ["to_k", "to_q", "to_v", "to_out.0"]  # the scripts' LoRA targets, our "attn" preset


def _ours(folder):
    base = load_base(str(folder))
    base.add_adapter("a", AdapterConfig(rank=4, alpha=4.0, seed=1), targets="attn")
    randomize(adapter_layers(base.pipe.unet), "a", seed=2, std=0.1)  # B non-zero: A gets gradients too
    return base


def _theirs(folder, pipeline_class, ours):
    """The scripts' UNet: diffusers' own model with a PEFT LoRA (r = alpha = 4) holding our weights."""
    from peft import LoraConfig

    pipe = pipeline_class.from_pretrained(str(folder))
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=ATTN))
    layers = adapter_layers(ours.pipe.unet)
    with torch.no_grad():
        for path, layer in layers.items():
            peft_layer = pipe.unet.get_submodule(path)
            peft_layer.lora_A["default"].weight.copy_(layer.adapters["a"].down)
            peft_layer.lora_B["default"].weight.copy_(layer.adapters["a"].up)
    return pipe, {path: pipe.unet.get_submodule(path) for path in layers}


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    return torch.randn(2, c, s, s, generator=g), torch.randn(2, c, s, s, generator=g)  # latents, noise


def _compare(ours, ours_loss, theirs_layers, theirs_loss):
    assert abs(ours_loss.item() - theirs_loss.item()) <= 1e-5 * max(1.0, abs(theirs_loss.item()))
    ours_loss.backward()
    theirs_loss.backward()
    compared = 0
    for path, layer in adapter_layers(ours.pipe.unet).items():
        a = layer.adapters["a"]
        for mine, theirs in ((a.down.grad, theirs_layers[path].lora_A["default"].weight.grad),
                             (a.up.grad, theirs_layers[path].lora_B["default"].weight.grad)):
            assert theirs is not None and mine is not None and theirs.abs().sum() > 0
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
            compared += 1
    assert compared >= 8


def _script_snr_loss(noise_scheduler, pred, target, timesteps):
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, GAMMA * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()


def test_sdxl_loss_and_gradients_equal_train_dreambooth_lora_sdxl(tiny_sdxl_dir):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    ours = _ours(tiny_sdxl_dir)
    pipe, theirs_layers = _theirs(tiny_sdxl_dir, StableDiffusionXLPipeline, ours)
    latents, noise = _inputs(pipe.unet)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    # Two pictures (w, h) in a side x side bucket, sizes where kohya's floor and the scripts' round agree on
    # the centre crop: one taller (cropped 16 px from the top), one wider (cropped 8 px from the left).
    sizes = [(side, side + 32), (side + 16, side)]

    # ours: the same calls the training loop makes
    hidden, pooled = TextEmbeddings(ours.pipe, trainable=False, device="cpu")(CAPTIONS)
    time_ids = torch.tensor([sdxl_time_ids(size, (side, side)) for size in sizes])
    with ours.mixer.apply(Mix({"a": 1.0}), mode="unfused"):
        ours_loss = training_loss(ours.pipe.unet, training_scheduler(ours), latents, noise, TIMESTEPS,
                                  unet_conditioning(hidden, pooled, time_ids), GAMMA)

    # theirs: train_dreambooth_lora_sdxl.py
    def tokenize_prompt(tokenizer, prompt):
        return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    embeds = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = encoder(tokenize_prompt(tokenizer, CAPTIONS), output_hidden_states=True, return_dict=False)
        pooled_theirs = out[0]
        embeds.append(out[-1][-2])
    prompt_embeds = torch.concat(embeds, dim=-1)

    def compute_time_ids(crops_coords_top_left, original_size):
        target_size = (side, side)
        return torch.tensor([list(original_size + crops_coords_top_left + target_size)], dtype=torch.float32)

    crops = [((size[1] - side) // 2, (size[0] - side) // 2) for size in sizes]  # (top, left)
    add_time_ids = torch.cat([compute_time_ids(c, (size[1], size[0])) for c, size in zip(crops, sizes)])
    noise_scheduler = DDPMScheduler.from_pretrained(str(tiny_sdxl_dir), subfolder="scheduler")
    noisy = noise_scheduler.add_noise(latents, noise, TIMESTEPS)
    pred = pipe.unet(noisy, TIMESTEPS, prompt_embeds,
                     added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled_theirs}).sample
    theirs_loss = _script_snr_loss(noise_scheduler, pred, noise, TIMESTEPS)
    torch.testing.assert_close(time_ids, add_time_ids, atol=0, rtol=0)
    _compare(ours, ours_loss, theirs_layers, theirs_loss)


@pytest.fixture(scope="module")
def tiny_sd2_v_dir(tmp_path_factory):
    from tests.tiny_models import build_tiny_sd2_v

    return build_tiny_sd2_v(tmp_path_factory.mktemp("tiny-sd2-v"))


def test_v_prediction_loss_and_gradients_equal_train_text_to_image_lora(tiny_sd2_v_dir):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    ours = _ours(tiny_sd2_v_dir)
    assert ours.family == "sd2" and training_scheduler(ours).config.prediction_type == "v_prediction"
    pipe, theirs_layers = _theirs(tiny_sd2_v_dir, StableDiffusionPipeline, ours)
    latents, noise = _inputs(pipe.unet, seed=1)

    hidden, pooled = TextEmbeddings(ours.pipe, trainable=False, device="cpu")(CAPTIONS)
    assert pooled is None
    with ours.mixer.apply(Mix({"a": 1.0}), mode="unfused"):
        ours_loss = training_loss(ours.pipe.unet, training_scheduler(ours), latents, noise, TIMESTEPS,
                                  unet_conditioning(hidden, None, None), GAMMA)

    # theirs: train_text_to_image_lora.py
    ids = pipe.tokenizer(CAPTIONS, max_length=pipe.tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids
    encoder_hidden_states = pipe.text_encoder(ids, return_dict=False)[0]
    noise_scheduler = DDPMScheduler.from_pretrained(str(tiny_sd2_v_dir), subfolder="scheduler")
    noisy = noise_scheduler.add_noise(latents, noise, TIMESTEPS)
    target = noise_scheduler.get_velocity(latents, noise, TIMESTEPS)
    pred = pipe.unet(noisy, TIMESTEPS, encoder_hidden_states, return_dict=False)[0]
    theirs_loss = _script_snr_loss(noise_scheduler, pred, target, TIMESTEPS)
    _compare(ours, ours_loss, theirs_layers, theirs_loss)
