"""Loading a base from every kind of name, and telling its family."""


import pytest
import torch
from safetensors.torch import save_file

from sdlora.errors import SdloraError
from sdlora.formats.ldm_checkpoint import pipeline_to_ldm
from sdlora.pipelines import family_from_checkpoint_keys, family_from_configs, load_base


def test_embedded_is_sd1_at_64px(embedded):
    assert embedded.kind == "embedded"
    assert embedded.family == "sd1"
    assert embedded.native_size == 64
    assert type(embedded.pipe).__name__ == "StableDiffusionPipeline"


def test_folder_sd1_and_sdxl_families(tiny_sd1_dir, tiny_sdxl_dir):
    sd1 = load_base(str(tiny_sd1_dir))
    sdxl = load_base(str(tiny_sdxl_dir))
    assert (sd1.kind, sd1.family, type(sd1.pipe).__name__) == ("folder", "sd1", "StableDiffusionPipeline")
    assert (sdxl.kind, sdxl.family, type(sdxl.pipe).__name__) == ("folder", "sdxl", "StableDiffusionXLPipeline")
    assert sdxl.pipe.text_encoder_2 is not None


def test_tiny_sdxl_generates(tiny_sdxl_dir):
    from sdlora.generate import GenerateSettings, generate

    base = load_base(str(tiny_sdxl_dir))
    [res] = generate(base, GenerateSettings(prompts=("a red circle",), steps=2, width=64, height=64), progress=False)
    assert res.image.size == (64, 64)


def test_sd2_family_from_configs_and_keys():
    assert family_from_configs({}, {"cross_attention_dim": 1024}, {"hidden_act": "gelu"}) == "sd2"
    assert family_from_configs({}, {"cross_attention_dim": 768}, {"hidden_act": "quick_gelu"}) == "sd1"
    assert family_from_configs({"text_encoder_2": ["transformers", "X"]}, {}, {}) == "sdxl"
    assert family_from_checkpoint_keys(["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"]) == "sd2"
    assert family_from_checkpoint_keys(["conditioner.embedders.1.model.ln_final.weight",
                                        "conditioner.embedders.0.transformer.text_model.x"]) == "sdxl"
    assert family_from_checkpoint_keys(["cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    with pytest.raises(SdloraError, match="not a Stable Diffusion checkpoint"):
        family_from_checkpoint_keys(["lora_unet_down.lora_up.weight"], "x.safetensors")


@pytest.fixture(scope="module")
def single_file(embedded, tmp_path_factory):
    p = embedded.pipe
    path = tmp_path_factory.mktemp("single") / "embedded.safetensors"
    save_file(pipeline_to_ldm(p.unet, p.vae, p.text_encoder), str(path))
    return path


def test_single_file_loads_the_same_weights(embedded, single_file):
    from sdlora.pipelines import embedded_path

    base = load_base(str(single_file), config=str(embedded_path()))
    assert (base.kind, base.family) == ("single_file", "sd1")
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(embedded.pipe, name).state_dict(), getattr(base.pipe, name).state_dict()
        assert set(ours) == set(theirs), name
        for key in ours:
            assert torch.equal(ours[key], theirs[key].reshape(ours[key].shape)), f"{name}.{key}"


def test_single_file_without_config_offline_says_what_to_do(single_file):
    with pytest.raises(SdloraError, match="--base-config"):
        load_base(str(single_file))


def test_hub_id_offline_says_how_to_use_a_local_folder():
    with pytest.raises(SdloraError, match=r"not a local path.*hf download someone/some-model --local-dir DIR"):
        load_base("someone/some-model")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoints_are_refused_unread(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04 not even opened")
    with pytest.raises(SdloraError, match="never unpickles"):
        load_base(str(path))


def test_unknown_path_folder_without_index_and_corrupt_file(tmp_path):
    with pytest.raises(SdloraError, match="no base at"):
        load_base(str(tmp_path / "missing"))
    with pytest.raises(SdloraError, match="no model_index.json"):
        load_base(str(tmp_path))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SdloraError, match="broken.safetensors is not a readable .safetensors"):
        load_base(str(broken))
