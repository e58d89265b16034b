"""The diffusion training objective, pure tensor math; shapes in the comments."""

from __future__ import annotations

import torch

from ..errors import SdloraError


def noise_like(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise (B, C, H, W); with `offset`, plus a per-channel constant (Guttenberg's noise
    offset), which lets the model learn darker and brighter pictures than mid-grey averages."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    if offset:
        noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator).to(noise)
    return noise


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v), as the base was trained."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise SdloraError(f"the base's scheduler predicts {kind!r}, which training does not support",
                      "train on a base whose scheduler config says prediction_type epsilon or v_prediction")


def loss_weights(scheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """(B,) min-SNR-gamma weights (Hang et al. 2023): min(snr, gamma) / snr for epsilon,
    min(snr, gamma) / (snr + 1) for v; ones when gamma is None."""
    if gamma is None:
        return torch.ones(timesteps.shape, dtype=torch.float32)
    alphas = scheduler.alphas_cumprod.to(torch.float32)[timesteps.cpu()]  # (B,)
    snr = alphas / (1 - alphas)
    denom = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    # Zero terminal SNR makes the last timestep's snr exactly 0: its epsilon weight is 0 / 0, taken as 0.
    return torch.where(denom > 0, torch.clamp(snr, max=gamma) / denom.clamp(min=1e-20), torch.zeros_like(snr))


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of weight x per-sample MSE; computed in fp32 whatever the model ran in. mask
    (B, 1, h, w) in [0, 1]: each sample's MSE is over its masked latents only (kohya's masked loss: the mean of
    mask x error over the mask's area), so what lies outside gives no gradient."""
    err = (pred.float() - target.float()).pow(2)
    dims = tuple(range(1, pred.dim()))
    if mask is None:
        per_sample = err.mean(dim=dims)  # (B,)
    else:
        m = mask.to(err.device, err.dtype)
        per_sample = (err * m).sum(dim=dims) / (m.sum(dim=dims) * err.shape[1]).clamp_min(1e-8)
    return (weights.to(per_sample.device) * per_sample).mean()


def training_loss(unet, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                  gamma: float | None, mask: torch.Tensor | None = None,
                  row_weights: torch.Tensor | None = None, given: tuple | None = None) -> torch.Tensor:
    """One batch's objective: latents (B, C, h, w) noised to `timesteps` (B,), the UNet's prediction under
    `cond` (text_cache.unet_conditioning) against the base's target, min-SNR weighted; row_weights (B,) multiply
    each row's term (regularization rows: --reg-weight), still averaged over all B rows, as kohya's
    prior_loss_weight is. given: (rows (n,), targets (n, C, h, w)) replaces those rows' targets (blank prompt
    preservation's blend with the base's own prediction)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, **cond).sample
    weights = loss_weights(scheduler, timesteps, gamma)
    if row_weights is not None:
        weights = weights * row_weights.to(weights)
    target = target_for(scheduler, latents, noise, timesteps)
    if given is not None:
        target = target.clone()
        target[given[0]] = given[1].to(target)
    return diffusion_loss(pred, target, weights, mask)


def blank_prompt_targets(base_unet, scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                         base_cond: dict, share: float) -> torch.Tensor:
    """Blank prompt preservation's targets for rows trained on the empty caption, latents (n, C, h, w): `share`
    of the base's own unconditional prediction (base_unet run outside any mix, base_cond the base encoders' empty
    caption) and the rest the usual target. An adapter whose unconditional learns the pictures fully gives
    classifier-free guidance nothing to pull toward (both branches carry the style); one that keeps the base's
    fully is pulled guidance-times too far. ai-toolkit weighs an extra blank-prompt step against the picture's
    instead; a blended target has the same minimiser and costs no extra backward pass."""
    with torch.no_grad():
        prior = base_unet(scheduler.add_noise(latents, noise, timesteps), timesteps, **base_cond).sample
    return share * prior.float() + (1 - share) * target_for(scheduler, latents, noise, timesteps).float()
