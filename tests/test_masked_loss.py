"""Masked loss: a mask per picture (NAME.mask.png beside it, or its alpha; white = learn), fitted with the
picture's bucket, shrunk to the latents, applied to the loss; what lies outside gives no gradient."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.training.data import scan
from sdlora.training.latents import cache_masks
from sdlora.training.loss import diffusion_loss


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("side", "alpha", "plain"):
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        if name == "alpha":  # opaque on the right half only
            alpha = np.zeros((64, 64, 1), dtype=np.uint8)
            alpha[:, 32:] = 255
            Image.fromarray(np.concatenate([pixels, alpha], axis=2), "RGBA").save(tmp_path / f"{name}.png")
        else:
            Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a {name} picture")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255  # learn the left half
    Image.fromarray(mask).save(tmp_path / "side.mask.png")
    return tmp_path


def test_masks_come_from_the_side_file_or_alpha_and_are_not_pictures(tmp_path):
    items, problems = scan(_folder(tmp_path))
    assert [i.image.name for i in items] == ["alpha.png", "plain.png", "side.png"] and not problems
    masks = cache_masks(items, [(64, 64)] * 3, scale=4, flip=True)
    alpha, plain, side = masks
    assert plain is None
    left = torch.zeros(1, 16, 16)
    left[..., :8] = 1.0
    assert torch.equal(side[0], left) and torch.equal(side[1], left.flip(-1))  # mirrored with the picture
    assert torch.equal(alpha[0], left.flip(-1))


def test_the_masked_out_half_gives_no_gradient():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 16, 16, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 16, 16, generator=g)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., :8] = 1.0
    mask[1] = 1.0  # the second picture learns everywhere
    diffusion_loss(pred, target, torch.ones(2), mask).backward()
    assert torch.count_nonzero(pred.grad[0, :, :, 8:]) == 0
    assert torch.count_nonzero(pred.grad[0, :, :, :8]) == pred.grad[0, :, :, :8].numel()
    assert torch.count_nonzero(pred.grad[1]) == pred.grad[1].numel()
    # with an all-white mask, the plain mean squared error
    full = diffusion_loss(pred, target, torch.ones(2), torch.ones(2, 1, 16, 16))
    torch.testing.assert_close(full, diffusion_loss(pred, target, torch.ones(2)))


@pytest.mark.slow
def test_pictures_masked_out_entirely_teach_the_adapter_nothing(tmp_path):
    """Every picture's mask black: the loss and every gradient are 0, so LoRA's B (zero at the start) stays 0."""
    from safetensors.torch import load_file

    from sdlora.training.config import TrainConfig
    from sdlora.training.loop import train

    data = tmp_path / "data"
    data.mkdir()
    _folder(data)
    for name in ("side", "alpha", "plain"):
        Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(data / f"{name}.mask.png")
    cfg = TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "out"), steps=3, batch_size=2, validation_split=0.0,
                      text_encoder=False, targets="attn")
    tensors = load_file(str(train(cfg, progress=False).adapter))
    ups = [t for k, t in tensors.items() if k.endswith("/up")]
    assert ups and all(torch.count_nonzero(t) == 0 for t in ups)
    unmasked = TrainConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "out2"), "masked_loss": False})
    tensors = load_file(str(train(unmasked, progress=False).adapter))
    assert any(torch.count_nonzero(t) > 0 for k, t in tensors.items() if k.endswith("/up"))
