"""LoRA Block Weight (hako-mikan's sd-webui-lora-block-weight): presets and weight lists against a table built by
hand from the extension's BLOCKID lists and its default presets, on the SD1.5 and SDXL UNet layouts."""

import numpy as np
import pytest

from sdlora.block_weights import lbw_weights
from sdlora.errors import SdloraError
from sdlora.inject import unet_targets, wrap
from sdlora.mixing import AdapterWeights, Mix
from sdlora.prompt_tags import parse_prompt_tags


def _sd15_layout():
    """SD1.5's UNet layout (4 down blocks, 2 layers each, 3 with attention) at toy widths."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2)


def _sdxl_layout():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8, 8), layers_per_block=2, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2, transformer_layers_per_block=(0, 1, 1),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


# The LDM block of each diffusers module prefix, written out by hand (input_blocks / middle_block / output_blocks).
SD15_BY_HAND = {
    "conv_in": "IN00",
    "down_blocks.0.attentions.0": "IN01", "down_blocks.0.resnets.0": "IN01",
    "down_blocks.0.attentions.1": "IN02", "down_blocks.0.resnets.1": "IN02", "down_blocks.0.downsamplers.0": "IN03",
    "down_blocks.1.attentions.0": "IN04", "down_blocks.1.resnets.0": "IN04",
    "down_blocks.1.attentions.1": "IN05", "down_blocks.1.resnets.1": "IN05", "down_blocks.1.downsamplers.0": "IN06",
    "down_blocks.2.attentions.0": "IN07", "down_blocks.2.resnets.0": "IN07",
    "down_blocks.2.attentions.1": "IN08", "down_blocks.2.resnets.1": "IN08", "down_blocks.2.downsamplers.0": "IN09",
    "down_blocks.3.resnets.0": "IN10", "down_blocks.3.resnets.1": "IN11",
    "mid_block": "M00",
    "up_blocks.0.resnets.0": "OUT00", "up_blocks.0.resnets.1": "OUT01", "up_blocks.0.resnets.2": "OUT02",
    "up_blocks.0.upsamplers.0": "OUT02",
    "up_blocks.1.attentions.0": "OUT03", "up_blocks.1.resnets.0": "OUT03", "up_blocks.1.attentions.1": "OUT04",
    "up_blocks.1.resnets.1": "OUT04", "up_blocks.1.attentions.2": "OUT05", "up_blocks.1.resnets.2": "OUT05",
    "up_blocks.1.upsamplers.0": "OUT05",
    "up_blocks.2.attentions.0": "OUT06", "up_blocks.2.resnets.0": "OUT06", "up_blocks.2.attentions.1": "OUT07",
    "up_blocks.2.resnets.1": "OUT07", "up_blocks.2.attentions.2": "OUT08", "up_blocks.2.resnets.2": "OUT08",
    "up_blocks.2.upsamplers.0": "OUT08",
    "up_blocks.3.attentions.0": "OUT09", "up_blocks.3.resnets.0": "OUT09", "up_blocks.3.attentions.1": "OUT10",
    "up_blocks.3.resnets.1": "OUT10", "up_blocks.3.attentions.2": "OUT11", "up_blocks.3.resnets.2": "OUT11",
}
# The extension's presets read through its 17-block list (BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03-OUT11):
MIDD_ON = {"BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"}
OUTS_ON = {"BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"}


def _block_by_hand(name: str) -> str | None:
    hits = [block for prefix, block in SD15_BY_HAND.items() if name == prefix or name.startswith(prefix + ".")]
    assert len(hits) <= 1, name
    return hits[0] if hits else None


@pytest.mark.parametrize("preset, on", [("MIDD", MIDD_ON), ("OUTS", OUTS_ON)])
def test_a_preset_weighs_each_sd15_layer_as_the_extensions_table_says(preset, on):
    unet = _sd15_layout()
    layers = wrap(unet, unet_targets(unet, "all") + ["conv_in", "time_embedding.linear_1", "conv_out"], "unet")
    w = AdapterWeights(unet=0.8, text_encoder=0.5, blocks=lbw_weights(preset))
    seen = set()
    for name, layer in layers.items():
        block = _block_by_hand(name)
        seen.add(block)
        expected = 0.8 if block is None else 0.8 * (block in on)  # outside every block: the UNet weight alone
        assert w.weight_for(layer.region, 0) == pytest.approx(expected), (name, layer.region)
    assert seen >= set(SD15_BY_HAND.values()), "every LDM block was visited"
    assert w.weight_for("text_encoder", 0) == pytest.approx(0.5)  # BASE (1 in both presets) on the TE weight


def test_sdxl_blocks_and_its_12_weight_form():
    unet = _sdxl_layout()
    layers = wrap(unet, unet_targets(unet, "all"), "unet")
    # SDXL's 12 blocks: BASE IN04 IN05 IN07 IN08 M00 OUT00-OUT05; here IN05 and OUT01 on only
    w = AdapterWeights(blocks=lbw_weights("0,0,1,0,0,0,0,1,0,0,0,0"))
    by_block = {"down_blocks.1.attentions.1": 1.0, "down_blocks.1.resnets.1": 1.0, "up_blocks.0.attentions.1": 1.0,
                "up_blocks.0.resnets.1": 1.0}
    for name, layer in layers.items():
        expected = next((v for p, v in by_block.items() if name.startswith(p + ".") or name == p), 0.0)
        assert w.weight_for(layer.region, 0) == expected, (name, layer.region)
    assert w.weight_for("text_encoder_2", 0) == 0.0  # BASE 0: both encoders off


def test_lbw_tags_lists_and_steps():
    _, tags = parse_prompt_tags("a circle <lora:x:0.5:0.8:lbw=OUTS:start=2:stop=9> <lora:y:lbw=1,0,0,0,0,0,0,0,0,0,0,1>")
    x, y = tags["x"], tags["y"]
    assert (x.text_encoder, x.unet, x.steps) == (0.5, 0.8, (2, 9))
    assert x.weight_for("unet.up.3.OUT10", 4) == pytest.approx(0.8) and x.weight_for("unet.up.1.OUT04", 4) == 0.0
    assert x.weight_for("unet.up.3.OUT10", 9) == 0.0 and x.weight_for("unet.up.3.OUT10", 1) == 0.0
    assert y.weight_for("unet.up.1.OUT05", 0) == 1.0 and y.weight_for("unet.mid.M00", 0) == 0.0  # 12: SDXL's list
    assert parse_prompt_tags("<lora:z:step=3-7>")[1]["z"].steps == (3, 7)
    # group and index shorthand keep working beside LBW names; the most specific key wins
    w = AdapterWeights(blocks={"down": 0.5, "down.1": 0.25, "IN05": 2.0})
    assert w.weight_for("unet.down.2.IN07", 0) == 0.5 and w.weight_for("unet.down.1.IN04", 0) == 0.25
    assert w.weight_for("unet.down.1.IN05", 0) == 2.0 and w.weight_for("unet.mid.M00", 0) == 1.0
    for bad in ("<lora:x:lbw=1,0,1>", "<lora:x:lbw=NOPE>", "<lora:x:start=a>"):
        with pytest.raises(SdloraError):
            parse_prompt_tags(bad)
    with pytest.raises(SdloraError):
        AdapterWeights(blocks={"IN5": 1.0})


def test_lbw_all_and_none_draw_the_plain_mix_and_the_plain_picture(tmp_path):
    from sdlora.generate import GenerateSettings, generate
    from sdlora.pipelines import load_base
    from tests.test_webui import _make_adapter

    maker = load_base("embedded")
    path = _make_adapter(maker, tmp_path / "style.safetensors", 3, "zstyle")
    base = load_base("embedded")
    base.load_adapter(path, "style")
    s = GenerateSettings(prompts=("a red circle",), seed=2, steps=6)

    def picture(mix):
        return np.asarray(generate(base, s, progress=False, mix=mix)[0].image)

    plain, full = picture(None), picture(Mix({"style": 1.0}))
    assert not np.array_equal(plain, full)
    assert np.array_equal(picture(Mix({"style": AdapterWeights(blocks=lbw_weights("ALL"))})), full)
    assert np.array_equal(picture(Mix({"style": AdapterWeights(blocks=lbw_weights("NONE"))})), plain)
    half = picture(Mix({"style": AdapterWeights(blocks=lbw_weights("MIDD"))}))
    assert not np.array_equal(half, plain) and not np.array_equal(half, full)


def test_a_26_weight_list_reaches_each_sd15_layer_by_its_own_block():
    from sdlora.block_weights import BLOCK26

    unet = _sd15_layout()
    layers = wrap(unet, unet_targets(unet, "all"), "unet")
    values = ",".join(str(k + 1) for k in range(26))  # block k of the 26-list (BASE IN00..IN11 M00 OUT00..OUT11): k+1
    w = AdapterWeights(blocks=lbw_weights(values))
    for name, layer in layers.items():
        block = _block_by_hand(name)
        expected = 1.0 if block is None else float(BLOCK26.index(block) + 1)
        assert w.weight_for(layer.region, 0) == expected, (name, layer.region)
