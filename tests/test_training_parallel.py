"""Data parallelism, gradient checkpointing and the text-embedding cache of the training loop."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdlora.training.distributed import local_rows
from tests.test_training_data import STYLES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("batch, world", [(4, 2), (5, 2), (1, 2), (7, 3), (3, 1)])
def test_local_rows_cover_the_batch_once_in_order(batch, world):
    shares = [local_rows(batch, rank, world) for rank in range(world)]
    rows = [i for s in shares for i in range(batch)[s]]
    assert rows == list(range(batch))
    sizes = [len(range(batch)[s]) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def _unet_and_mix(tiny_sd1_dir):
    from sdlora.adapters import AdapterConfig
    from sdlora.inject import adapter_layers
    from sdlora.mixing import Mix
    from sdlora.pipelines import load_base
    from tests.core_helpers import randomize

    base = load_base(str(tiny_sd1_dir))
    base.add_adapter("a", AdapterConfig(rank=4, seed=0), targets="linear")
    randomize(adapter_layers(base.pipe.unet), "a", seed=1)
    return base, Mix({"a": 1.0})


def _grads(base, mix, backward_inside: bool):
    """Adapter gradients of one UNet forward (2, 4, 8, 8); backward inside or after the mix's block."""
    unet = base.pipe.unet
    unet.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, unet.config.in_channels, 8, 8), generator=gen)
    hidden = torch.randn((2, 77, unet.config.cross_attention_dim), generator=gen)
    with base.mixer.apply(mix, mode="unfused"):
        out = unet(x, torch.tensor([10, 500]), hidden).sample.square().mean()
        if backward_inside:
            out.backward()
    if not backward_inside:
        out.backward()  # as on CUDA, where autograd runs the backward in threads without our ContextVar
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_recomputes_under_the_forward_mix(tiny_sd1_dir):
    from sdlora.training.loop import enable_unet_checkpointing

    base, mix = _unet_and_mix(tiny_sd1_dir)
    unet = base.pipe.unet.train()
    reference = _grads(base, mix, backward_inside=True)
    assert all(g.abs().sum() > 0 for g in reference.values())

    # diffusers' own checkpointing recomputes in whatever context the backward runs: without the mix
    # the adapter saves fewer tensors, which torch detects (the hazard this test guards against).
    unet.enable_gradient_checkpointing()
    from torch.utils.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="different number of tensors"):
        _grads(base, mix, backward_inside=False)

    enable_unet_checkpointing(unet)
    ours = _grads(base, mix, backward_inside=False)
    for n in reference:
        torch.testing.assert_close(ours[n], reference[n], atol=1e-6, rtol=1e-5)
    unet.disable_gradient_checkpointing()


def test_frozen_text_encoder_outputs_are_cached_per_caption(tiny_sd1_dir):
    from sdlora.pipelines import load_base
    from sdlora.training.text_cache import TextEmbeddings

    pipe = load_base(str(tiny_sd1_dir)).pipe
    texts = TextEmbeddings(pipe, trainable=False, device="cpu")
    calls = []
    pipe.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    first, pooled = texts(["a red circle", "a blue square", "a red circle"])
    again, _ = texts(["a blue square", "a red circle"])
    assert calls == [1, 1] and pooled is None  # each distinct caption encoded once, alone; SD1 has no pooled
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
    ids = pipe.tokenizer(["a blue square"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(first[1], pipe.text_encoder(ids)[0][0])
    trainable = TextEmbeddings(pipe, trainable=True, device="cpu")  # a trained encoder is run every time
    trainable(["a red circle", "a blue square"])
    trainable(["a red circle"])
    assert calls == [1, 1, 1, 2, 1] and not trainable.cache  # the third is the check above


def test_sdxl_text_embeddings_are_both_encoders_penultimate_states_and_the_pooled_one_all_cached(tiny_sdxl_dir):
    from sdlora.pipelines import load_base
    from sdlora.training.text_cache import TextEmbeddings

    pipe = load_base(str(tiny_sdxl_dir)).pipe
    texts = TextEmbeddings(pipe, trainable=False, device="cpu")
    calls = []
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    hidden, pooled = texts(["a red circle", "a red circle", "a blue square"])
    dims = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert hidden.shape == (3, 77, dims) and pooled.shape == (3, pipe.text_encoder_2.config.projection_dim)
    assert calls == [1, 1, 1, 1]  # two captions, each through both encoders once
    hidden2, pooled2 = texts(["a blue square"])
    assert calls == [1, 1, 1, 1] and torch.equal(hidden2[0], hidden[2]) and torch.equal(pooled2[0], pooled[2])
    # what SDXL's own pipeline feeds its UNet for this prompt (no guidance: the positive half only)
    with torch.no_grad():
        embeds, _, pooled_pipe, _ = pipe.encode_prompt("a blue square", device="cpu", num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden2, embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled2, pooled_pipe, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_two_processes_train_the_adapter_one_process_trains(tmp_path):
    """`accelerate launch` with 2 processes on the CPU: each takes half of every global batch."""
    from safetensors.torch import load_file

    from sdlora.adapter_io import read_adapter_file

    config = tmp_path / "style.toml"
    config.write_text(f'data_dir = "{STYLES / "stripes"}"\nsteps = 8\nbatch_size = 4\nrank = 4\nlr = 1e-3\n'
                      'seed = 5\ntrigger = "zstripes"\nvalidation_split = 0.1\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "train_scripts" / "train_lora.py")
    one = subprocess.run([sys.executable, script, "--config", str(config), "--out", str(tmp_path / "one"), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", script, "--config", str(config),
                          "--out", str(tmp_path / "two"), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]

    a = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter.safetensors"))
    assert read_adapter_file(tmp_path / "one" / "adapter.safetensors").training["processes"] == 1
    assert read_adapter_file(tmp_path / "two" / "adapter.safetensors").training["processes"] == 2
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)
    loss_one = (tmp_path / "one" / "logs" / "loss.csv").read_text().splitlines()
    loss_two = (tmp_path / "two" / "logs" / "loss.csv").read_text().splitlines()
    assert len(loss_one) == len(loss_two) == 9
    for r1, r2 in zip(loss_one[1:], loss_two[1:]):
        assert float(r1.split(",")[2]) == pytest.approx(float(r2.split(",")[2]), rel=1e-4)


@pytest.mark.slow
def test_gradient_checkpointing_and_accumulation_in_a_real_run(tmp_path):
    """A step with --grad-accum 2 consumes two batches; checkpointing changes memory, not the result."""
    from safetensors.torch import load_file

    from sdlora.adapter_io import read_adapter_file
    from sdlora.training.config import TrainConfig
    from sdlora.training.loop import train

    common = dict(data_dir=str(STYLES / "dots"), rank=4, steps=3, batch_size=2, grad_accum=2, lr=1e-3, seed=2,
                  validation_split=0)
    plain = train(TrainConfig(out_dir=str(tmp_path / "plain"), **common), progress=False)
    ckpt = train(TrainConfig(out_dir=str(tmp_path / "ckpt"), gradient_checkpointing=True, **common), progress=False)
    assert len(plain.losses) == 3 and plain.losses == pytest.approx(ckpt.losses, rel=1e-6)
    a, b = load_file(str(plain.adapter)), load_file(str(ckpt.adapter))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    assert read_adapter_file(ckpt.adapter).training["gradient_checkpointing"] is True
