"""Adapter files: every method through every layout and back; diffusers' own loader as oracle;
files written by diffusers read by us; bad files refused clearly with the pipeline unchanged."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora.adapter_io import describe, load_adapter, read_adapter_file, save_adapter
from sdlora.adapters import AdapterConfig
from sdlora.errors import SdloraError
from sdlora.inject import adapter_layers
from sdlora.mixing import Mix
from sdlora.pipelines import load_base
from tests.core_helpers import randomize, same_bits, snapshot


def outputs(base, name=None, unet_hidden=None, mix=None):
    """(text-encoder hidden states, UNet output) for fixed inputs, with adapter `name` at weight 1
    (or with `mix`)."""
    g = torch.Generator().manual_seed(0)
    unet = base.pipe.unet
    sample = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    ids = base.pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    kwargs = {}
    if base.family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    mix = mix or (Mix({name: 1.0}) if name else None)
    with torch.no_grad(), base.mixer.apply(mix, mode="unfused"):
        te = base.pipe.text_encoder(ids)[0]
        hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g) if unet_hidden is None else unet_hidden
        return te, unet(sample, 500, hidden, **kwargs).sample


def trained(base, name, method, targets, seed=1):
    base.add_adapter(name, AdapterConfig(method=method, rank=4, alpha=2.0, seed=seed), targets=targets,
                     text_encoder=True)
    for model in base.models().values():
        randomize({k: v for k, v in adapter_layers(model).items() if name in v.adapters}, name, seed=seed + 2, std=0.1)
    return base


@pytest.fixture(scope="module")
def sd1_source():
    base = load_base("embedded")
    for method, targets in [("lora", "all"), ("dora", "linear"), ("vera", "linear")]:
        trained(base, method, method, targets)
    return base


@pytest.mark.parametrize("fmt", ["sdlora", "kohya", "diffusers"])
@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_round_trip_every_method_through_every_format(sd1_source, tmp_path, method, fmt):
    path = tmp_path / f"{method}.safetensors"
    save_adapter(sd1_source, method, path, fmt, trigger_words=["zstripes"])
    base = load_base("embedded")
    loaded = load_adapter(base, path, "copy")
    assert loaded.file.format == fmt and loaded.warnings == []
    for ours, theirs in zip(outputs(sd1_source, method), outputs(base, "copy")):
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # alpha is never lost: the per-module scale survives (VeRA leaves as the plain LoRA it equals)
    src = read_adapter_file(path, base)
    scales = {m.scale for m in src.modules.values()}
    assert scales == ({1.0} if method == "vera" else {0.5})


def _diffusers_pipe(family_dir=None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sdlora.pipelines import embedded_path

    if family_dir is None:
        return StableDiffusionPipeline.from_pretrained(embedded_path(), safety_checker=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline.from_pretrained(family_dir)


class _Theirs:
    """A diffusers pipeline wearing the Base interface that `outputs` needs."""

    def __init__(self, pipe, family):
        import contextlib

        self.pipe, self.family = pipe, family
        self.mixer = type("NoMix", (), {"apply": staticmethod(lambda mix, mode=None: contextlib.nullcontext())})


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("method, targets", [("lora", "attn"), ("lora", "linear"), ("lora", "all"), ("vera", "linear")])
def test_diffusers_load_lora_weights_gives_our_outputs(request, tmp_path, family, fmt, method, targets):
    family_dir = None if family == "sd1" else request.getfixturevalue("tiny_sdxl_dir")
    base = trained(load_base("embedded" if family == "sd1" else str(family_dir)), "a", method, targets)
    path = tmp_path / "a.safetensors"
    save_adapter(base, "a", path, fmt)
    pipe = _diffusers_pipe(family_dir)
    pipe.load_lora_weights(str(path), adapter_name="a")
    ours, theirs = outputs(base, "a"), outputs(_Theirs(pipe, family))
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(t, o, atol=1e-4, rtol=0)
    if family == "sdxl":  # the second text encoder too
        ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            theirs2 = pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
            with base.mixer.apply(Mix({"a": 1.0})):
                ours2 = base.pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(theirs2, ours2, atol=1e-4, rtol=0)


def _skip_unless_transformers_accepts_peft():
    """diffusers' training scripts add the text encoder's LoRA through transformers' PEFT integration
    (`text_encoder.add_adapter`), which refuses a peft older than it needs (transformers 5.24.0 needs peft
    0.22.0, unreleased when this was written): skip there, naming both versions, instead of failing."""
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations import peft as transformers_peft

    needed = getattr(transformers_peft, "MIN_PEFT_VERSION", None)
    if needed and Version(version("peft")) < Version(needed):
        pytest.skip(f"transformers {version('transformers')}'s PEFT integration needs peft >= {needed}; "
                    f"peft {version('peft')} is installed (the lock holds transformers back: requirements/hold.txt)")


@pytest.mark.slow
def test_a_file_saved_by_diffusers_after_peft_training_loads_with_the_same_outputs(tmp_path):
    _skip_unless_transformers_accepts_peft()
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _diffusers_pipe()
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "ff.net.2"],
                                     init_lora_weights="gaussian"))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc1"]))
    params = [p for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    theirs_base = _Theirs(pipe, "sd1")
    for _ in range(2):  # "training": a few real optimizer steps on the PEFT layers
        g = torch.Generator().manual_seed(1)
        ids = pipe.tokenizer(["a blue square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        h = pipe.text_encoder(ids)[0]
        loss = pipe.unet(torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=g), 300, h).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet_sd, te_sd = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    type(pipe).save_lora_weights(tmp_path, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                                 unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
                                 text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    expected = outputs(theirs_base)
    base = load_base("embedded")
    loaded = load_adapter(base, tmp_path / "pytorch_lora_weights.safetensors", "peft")
    assert loaded.file.format == "diffusers"
    for o, t in zip(outputs(base, "peft"), expected):
        torch.testing.assert_close(o, t, atol=1e-5, rtol=0)
    # diffusers' own kohya conversion of the same weights loads too (alphas written as the rank: scale 1,
    # so compare against PEFT's weights re-scaled the same way)
    kohya_sd = convert_state_dict_to_kohya({**{f"unet.{k}": v for k, v in unet_sd.items()},
                                            **{f"text_encoder.{k}": v for k, v in te_sd.items()}})
    save_file({k: v.contiguous() for k, v in kohya_sd.items()}, str(tmp_path / "kohya.safetensors"))
    base2 = load_base("embedded")
    loaded2 = load_adapter(base2, tmp_path / "kohya.safetensors", "k")
    assert loaded2.file.format == "kohya" and loaded2.layers == loaded.layers
    unet_scales = {m.scale for k, m in loaded2.file.modules.items() if k.startswith("unet/")}
    assert unet_scales == {1.0}  # convert_state_dict_to_kohya writes alpha = rank


# ---- bad input: one clear error naming the file and the key, and the pipeline as it was ----

def _assert_refused(base, path, match):
    before = snapshot(base.pipe.unet), snapshot(base.pipe.text_encoder)
    with pytest.raises(SdloraError, match=match):
        load_adapter(base, path, "bad")
    assert same_bits(before[0], snapshot(base.pipe.unet)) and same_bits(before[1], snapshot(base.pipe.text_encoder))
    assert "bad" not in base.adapter_info and not any("bad" in layer.adapters for layer in base.mixer.layers().values())


@pytest.fixture
def good_file(sd1_source, tmp_path):
    return save_adapter(sd1_source, "lora", tmp_path / "good.safetensors", "kohya")


def test_truncated_file(good_file, tmp_path):
    data = good_file.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    _assert_refused(load_base("embedded"), bad, r"cut.safetensors is truncated or not a .safetensors file")


def test_non_finite_tensor(good_file, tmp_path):
    sd = load_file(str(good_file))
    key = sorted(k for k in sd if k.endswith("lora_up.weight"))[0]
    sd[key][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    _assert_refused(load_base("embedded"), tmp_path / "nan.safetensors", rf"nan.safetensors: tensor '{key}' holds NaN")


def test_sdxl_adapter_on_sd1_base_names_both_families(tiny_sdxl_dir, tmp_path):
    xl = trained(load_base(str(tiny_sdxl_dir)), "xl", "lora", "attn")
    path = save_adapter(xl, "xl", tmp_path / "xl.safetensors", "kohya")
    _assert_refused(load_base("embedded"), path, r"xl.safetensors is an adapter for sdxl, but the base is sd1")
    # the same without metadata saying so: the shapes give it away
    path2 = save_adapter(xl, "xl", tmp_path / "xl2.safetensors", "diffusers")
    _assert_refused(load_base("embedded"), path2, r"xl2.safetensors: .* needs")


def test_no_key_matches_the_base(tmp_path):
    save_file({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(4, 2)}, str(tmp_path / "none.safetensors"))
    _assert_refused(load_base("embedded"), tmp_path / "none.safetensors", r"none.safetensors: none of its keys names a layer of this sd1 base \(lora_unet_nowhere_to_q")


def test_not_an_adapter_at_all(tmp_path):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    _assert_refused(load_base("embedded"), tmp_path / "model.safetensors", r"holds no adapter keys sdlora knows")


def test_unknown_keys_warn_with_their_names(good_file, tmp_path):
    sd = load_file(str(good_file))
    sd["lora_unet_imaginary_layer.lora_down.weight"] = torch.zeros(2, 8)
    sd["lora_unet_imaginary_layer.lora_up.weight"] = torch.zeros(8, 2)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.warns(UserWarning, match=r"2 key\(s\) match nothing.*lora_unet_imaginary_layer"):
        loaded = load_adapter(load_base("embedded"), tmp_path / "extra.safetensors", "x")
    assert loaded.layers > 0


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickles_are_refused_unread(tmp_path, suffix):
    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(b"\x80\x04 never opened")
    _assert_refused(load_base("embedded"), path, "never unpickles")


def test_writing_over_a_file_being_read_is_safe(sd1_source, tmp_path):
    path = save_adapter(sd1_source, "lora", tmp_path / "same.safetensors", "sdlora")
    af = read_adapter_file(path)  # tensors are copies: the file may be replaced under them
    save_adapter(sd1_source, "dora", path, "sdlora")
    assert read_adapter_file(path).method == "dora" and af.method == "lora"
    assert not list(tmp_path.glob(".*.tmp"))


def test_inspect_reports_format_method_rank_alpha_targets(sd1_source, tmp_path):
    path = save_adapter(sd1_source, "dora", tmp_path / "d.safetensors", "kohya", trigger_words=["zdots"])
    info = describe(read_adapter_file(path), str(path))
    assert (info["format"], info["method"], info["base_family"]) == ("kohya", "dora", "sd1")
    assert info["ranks"] == [4] and info["alphas"] == [2.0] and info["trigger_words"] == ["zdots"]
    assert set(info["modules_by_role"]) == {"unet", "text_encoder"}
    assert info["metadata"]["ss_network_dim"] == "4" and info["metadata"]["modelspec.architecture"].startswith("stable-diffusion-v1")
    json.dumps(info)  # all of it serialises for --json


@pytest.mark.slow
def test_dora_file_in_diffusers_layout_loads_into_peft_with_our_outputs(sd1_source, tmp_path):
    """diffusers' load_lora_weights cannot round-trip even its own DoRA files (0.26 off on the UNet
    with diffusers 0.42.1), so PEFT's layers are the oracle: our file, loaded by PEFT itself."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    path = save_adapter(sd1_source, "dora", tmp_path / "d.safetensors", "diffusers")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    sd = load_file(str(path))
    unet_sd = {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}
    pipe = _diffusers_pipe()
    pipe.unet.add_adapter(LoraConfig(r=meta["unet.r"], lora_alpha=meta["unet.lora_alpha"], use_dora=True,
                                     target_modules=meta["unet.target_modules"]))
    result = set_peft_model_state_dict(pipe.unet, unet_sd)
    assert not result.unexpected_keys
    te_hidden = outputs(sd1_source, "dora")[0]  # the UNet sees the same text-encoder output
    ours = outputs(sd1_source, "dora", unet_hidden=te_hidden)[1]
    theirs = outputs(_Theirs(pipe, "sd1"), unet_hidden=te_hidden)[1]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
