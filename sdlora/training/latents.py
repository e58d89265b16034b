"""Training pictures as latents: the buckets a run uses, and each picture encoded once per resolution by the VAE."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import SdloraError
from .data import fit_to_bucket, make_buckets
from .images import load_rgb


def _unet_step(pipe) -> int:
    """Picture sides must divide down to whole latents at the UNet's deepest level (SD1/SD2 64, SDXL 32)."""
    return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def training_buckets(cfg, base) -> list[list[tuple[int, int]]]:
    """The (w, h) buckets of a run, one set per --resolution (default: the base's native size): --bucket-step
    (default 64 for real bases, the UNet's finest step for tiny ones), sides between --min-bucket and
    --max-bucket (default twice that resolution)."""
    unet_step = _unet_step(base.pipe)
    step = cfg.bucket_step or (64 if base.native_size >= 512 and 64 % unet_step == 0 else unet_step)
    if step % unet_step:
        raise SdloraError(f"training setting bucket_step = {step} is not a multiple of this base's {unet_step} px",
                          f"pass --bucket-step {unet_step} or a multiple of it")
    sets = []
    for resolution in cfg.resolution or (base.native_size,):
        buckets = make_buckets(resolution, step, min_side=cfg.min_bucket, max_side=cfg.max_bucket or 2 * resolution)
        if not buckets:
            raise SdloraError(f"no bucket of {step}-px steps fits between min_bucket {cfg.min_bucket} and max_bucket "
                              f"{cfg.max_bucket} at resolution {resolution}", "widen --min-bucket / --max-bucket")
        sets.append(buckets)
    return sets


@torch.no_grad()
def cache_masks(items, buckets, scale: int, flip: bool) -> list[tuple[torch.Tensor, ...] | None]:
    """Per picture: None (no mask: learn everywhere), or its loss mask at latent size, (1, h, w) in [0, 1], fitted
    to its bucket as the picture is and box-averaged down by the VAE's factor `scale`; with flip, also mirrored."""
    from .images import load_mask

    out = []
    for item, bucket in zip(items, buckets):
        mask = load_mask(item.image)
        if mask is None:
            out.append(None)
            continue
        small = fit_to_bucket(mask, bucket).resize((bucket[0] // scale, bucket[1] // scale), Image.BOX)
        m = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None]  # (1, h, w)
        out.append((m, m.flip(-1)) if flip else (m,))
    return out


def cache_latents(pipe, items, buckets, flip: bool) -> list[tuple[torch.Tensor, ...]]:
    """Per picture: the VAE posterior's mean and std, (C, h, w) each, encoded once; with flip, also those
    of the mirrored picture."""
    vae = pipe.vae

    def encode(img):
        rgb = np.asarray(img, dtype=np.float32)  # (H, W, 3)
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None] / 127.5 - 1.0  # (1, 3, H, W) in [-1, 1]
        dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
        return dist.mean[0].float().cpu(), dist.std[0].float().cpu()

    cache = []
    for item, bucket in zip(items, buckets):
        img = fit_to_bucket(load_rgb(item.image), bucket)
        cache.append(encode(img) + (encode(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) if flip else ()))
    return cache


def shift_latents(x: torch.Tensor, shifts: list[tuple[int, int]]) -> torch.Tensor:
    """(B, C, h, w) latents (or masks), row b moved right by shifts[b][0] and down by shifts[b][1] whole latents
    (negative: left, up), the vacated border filled by repeating the edge, as a picture's uniform ground extends."""
    n = max(max(abs(dx), abs(dy)) for dx, dy in shifts)
    if n == 0:
        return x
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (n, n, n, n), mode="replicate")  # (B, C, h + 2n, w + 2n)
    return torch.stack([padded[b, :, n - dy : n - dy + h, n - dx : n - dx + w] for b, (dx, dy) in enumerate(shifts)])
