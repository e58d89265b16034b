"""Block-wise learning rates and ranks in training (sdlora/training/blocks.py): block_lr / block_rank name the
layers a mix's block weights name, kohya's down/mid/up_lr_weight land on kohya's block index, a block at 0 gets
no adapter, and a run with them writes a file that exports to kohya's layout and loads back."""

import math

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.inject import adapter_layers, region_of, unet_targets
from sdlora.mixing import AdapterWeights
from sdlora.pipelines import load_base
from sdlora.training.blocks import BlockPlan
from sdlora.training.config import TrainConfig
from sdlora.training.setup import add_training_adapter, optimizer_groups
from tests.test_training_data import STYLES


def _cfg(**kw):
    return TrainConfig(data_dir="data", out_dir="out", **kw)


def test_block_lr_and_rank_reach_exactly_the_layers_a_mix_names(tmp_path):
    block_lr = {"down": 0.5, "mid": 0.0, "up.1": 2.0, "OUT07": 3.0}
    cfg = _cfg(rank=4, lr=1e-3, loraplus_ratio=4.0, text_encoder_lr=5e-4,
               block_lr="down=0.5, mid=0, up.1=2, OUT07=3", block_rank="down=2, up=8, IN04=6, BASE=3")
    base = load_base("embedded")
    plan = add_training_adapter(cfg, base, {"text_encoder": 5e-4})
    groups = optimizer_groups(cfg, base, {"text_encoder": 5e-4}, plan)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    mix = AdapterWeights(blocks=block_lr)  # the mix's own reading of the same names
    unet = adapter_layers(base.pipe.unet)
    targets = unet_targets(base.pipe.unet, cfg.targets)
    for path in targets:
        factor = mix.weight_for(region_of("unet", path), 0)
        if factor == 0:  # the mid block: no adapter at all
            assert path not in unet, path
            continue
        adapter = unet[path].adapters["adapter"]
        assert lr_of[id(adapter.down)] == pytest.approx(1e-3 * factor), path
        assert lr_of[id(adapter.up)] == pytest.approx(1e-3 * factor * 4.0), path  # LoRA+ on top
    assert len(targets) - len(unet) == 18 and not any(p.startswith("mid_block") for p in unet)  # the mid block's 18
    assert sum(len(g["params"]) for g in groups) == sum(len(list(a.adapters["adapter"].parameters()))
                                                        for a in [*unet.values(), *adapter_layers(base.pipe.text_encoder).values()])
    # ranks, hand-written: the most specific key wins; alpha unset = rank per module, scale 1
    expect = {"down_blocks.0.resnets.0.conv1": 2, "down_blocks.1.attentions.0.proj_in": 6,
              "up_blocks.1.resnets.0.conv1": 8, "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q": 8}
    for path, rank in expect.items():
        adapter = unet[path].adapters["adapter"]
        assert (adapter.rank, adapter.down.shape[0], adapter.scale) == (rank, rank, 1.0), path
    lrs = {path: lr_of[id(unet[path].adapters["adapter"].down)] for path in expect}
    assert lrs == pytest.approx({"down_blocks.0.resnets.0.conv1": 5e-4, "down_blocks.1.attentions.0.proj_in": 5e-4,
                                 "up_blocks.1.resnets.0.conv1": 2e-3,
                                 "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q": 3e-3})
    text = adapter_layers(base.pipe.text_encoder)
    assert {a.adapters["adapter"].rank for a in text.values()} == {3}  # BASE: the text encoder's rank
    assert {lr_of[id(a.adapters["adapter"].down)] for a in text.values()} == {5e-4}  # its rate, untouched


# kohya's get_block_index (sd-scripts networks/lora.py), written out by hand for SD1.5 module names:
# down_blocks.i.{resnets,attentions}.j -> 1 + 3i + j, downsamplers -> 3 + 3i, mid -> 12, up_blocks.i.* -> 13 + 3i + j
KOHYA_SD1 = {"down_blocks.0.attentions.0.proj_in": 1, "down_blocks.0.resnets.1.conv2": 2,
             "down_blocks.0.downsamplers.0.conv": 3, "down_blocks.1.resnets.0.conv1": 4,
             "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2": 8, "down_blocks.3.resnets.1.conv1": 11,
             "mid_block.attentions.0.proj_out": 12, "mid_block.resnets.1.conv2": 12,
             "up_blocks.0.resnets.2.conv1": 15, "up_blocks.0.upsamplers.0.conv": 15,
             "up_blocks.1.attentions.0.proj_in": 16, "up_blocks.2.resnets.1.time_emb_proj": 20,
             "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k": 24}
# SDXL: kohya reads the LDM names: input_blocks.N -> 1 + N, middle_block -> 10-12, output_blocks.N -> 13 + N
KOHYA_SDXL = {"down_blocks.0.resnets.1.conv1": 1 + 2, "down_blocks.0.downsamplers.0.conv": 1 + 3,
              "down_blocks.1.attentions.0.proj_in": 1 + 4, "down_blocks.2.resnets.1.conv2": 1 + 8,
              "up_blocks.0.attentions.2.proj_out": 13 + 2, "up_blocks.1.upsamplers.0.conv": 13 + 5,
              "up_blocks.2.resnets.0.conv1": 13 + 6}


def test_kohya_lr_weights_land_on_kohyas_block_index():
    down = [round(0.1 + k / 100, 2) for k in range(12)]  # every block its own weight
    up = [round(2.0 + k / 100, 2) for k in range(12)]
    plan = BlockPlan.of(_cfg(down_lr_weight=",".join(map(str, down)), mid_lr_weight=0.7,
                             up_lr_weight=",".join(map(str, up))), sdxl=False)
    table = down + [0.7] + up  # kohya's block_lr_weight: index 0-11 down, 12 mid, 13-24 up
    for name, index in KOHYA_SD1.items():
        assert plan.lr_weight(region_of("unet", name)) == table[index], name
    assert plan.lr_weight("text_encoder") == 1.0  # text encoders unaffected
    plan = BlockPlan.of(_cfg(down_lr_weight=",".join(map(str, down[:9])), up_lr_weight=",".join(map(str, up[:9]))),
                        sdxl=True)
    table = [1.0] + down[:9] + [1.0] * 3 + up[:9]  # SDXL's: 0 time embedding, 1-9 input, 10-12 middle, 13-21 output
    for name, index in KOHYA_SDXL.items():
        assert plan.lr_weight(region_of("unet", name)) == table[index], name
    # presets against their formulas, and the threshold: a given weight at or below it means no adapter
    plan = BlockPlan.of(_cfg(down_lr_weight="cosine+0.5", up_lr_weight="linear", block_lr_zero_threshold=0.05), False)
    for k in range(12):
        assert plan.lr_weight(f"unet.down.0.IN{k:02d}") == pytest.approx(math.cos(math.pi / 2 * k / 11) + 0.5)
    assert plan.lr_weight("unet.up.0.OUT00") == 0 and plan.rank_of("unet.up.0.OUT00") == 0
    assert plan.lr_weight("unet.up.0.OUT01") == pytest.approx(1 / 11) and plan.rank_of("unet.up.0.OUT01") == 16
    assert plan.lr_weight("unet.mid.M00") == 1.0  # not given: 1, never thresholded
    short = BlockPlan.of(_cfg(up_lr_weight="0,,0.5"), sdxl=False)  # kohya: empty entry 0, the rest filled with 1
    assert [short.lr_weight(f"unet.up.0.OUT{k:02d}") for k in range(4)] == [0.0, 0.0, 0.5, 1.0]
    with pytest.raises(SdloraError, match="down_lr_weight.*12 weights, but this base has 9"):
        BlockPlan.of(_cfg(down_lr_weight=",".join(["1"] * 12)), sdxl=True)


@pytest.mark.parametrize("settings, message", [
    ({"block_lr": "down=0.5, dwn=1"}, "block_lr: unknown block name.*dwn"),
    ({"block_rank": "up=2.5"}, "block_rank = 'up=2.5': up's '2.5' must be a whole number"),
    ({"block_lr": "BASE=2"}, "block_lr: BASE.*--text-encoder-lr"),
    ({"block_lr": "up=1", "mid_lr_weight": 0.5}, "block_lr and mid_lr_weight both set"),
    ({"down_lr_weight": "0.5"}, "down_lr_weight = '0.5': one number is not a list"),
    ({"up_lr_weight": "sinus"}, "up_lr_weight = 'sinus': neither a preset nor a list"),
    ({"down_lr_weight": ",".join(["1"] * 13)}, "13 weights, but this base has 12"),
])
def test_bad_block_settings_are_refused_naming_the_key(settings, message):
    with pytest.raises(SdloraError, match=message):
        _cfg(**settings)


def test_block_settings_are_flags_and_toml_keys(tmp_path):
    from sdlora.cli import build_parser

    args = build_parser().parse_args(["train", "d", "--out", "o", "--block-lr", "down=0.5", "--block-rank", "up=8",
                                      "--mid-lr-weight", "0", "--block-lr-zero-threshold", "0.1"])
    assert (args.block_lr, args.block_rank, args.mid_lr_weight, args.block_lr_zero_threshold) == ("down=0.5", "up=8", 0.0, 0.1)
    toml = tmp_path / "t.toml"
    toml.write_text('data_dir = "d"\nout_dir = "o"\ndown_lr_weight = "sine+0.5"\nup_lr_weight = "1,1,0"\n'
                    'mid_lr_weight = 0\nblock_rank = "IN05=32"\n')
    cfg = TrainConfig.load(toml)
    assert (cfg.down_lr_weight, cfg.up_lr_weight, cfg.mid_lr_weight, cfg.block_rank) == ("sine+0.5", "1,1,0", 0.0, "IN05=32")


def test_a_block_the_unet_lacks_is_refused():
    base = load_base("embedded")  # three levels: down.3 and OUT09 do not exist
    for settings in ({"block_rank": "down.3=4"}, {"block_lr": "OUT09=2"}):
        with pytest.raises(SdloraError, match="names (down.3|OUT09), a block this base's UNet does not have"):
            add_training_adapter(_cfg(**settings), base, {})


@pytest.mark.slow
def test_a_run_with_block_lr_and_rank_exports_to_kohya_and_loads_back(tmp_path):
    from safetensors import safe_open

    from sdlora.adapter_io import load_adapter, read_adapter_file
    from sdlora.cli import main
    from tests.test_formats import outputs

    out = tmp_path / "run"
    assert main(["train", str(STYLES / "dots"), "--out", str(out), "--steps", "2", "--batch-size", "2", "--rank", "4",
                 "--lr", "1e-2", "--validation-split", "0", "--block-lr", "down=0.5, mid=0, up.1=2",
                 "--block-rank", "down=2, up.2=8", "--quiet"]) == 0
    af = read_adapter_file(out / "adapter.safetensors")
    ranks = {key: m.rank for key, m in af.modules.items()}
    assert {ranks[k] for k in ranks if k.startswith("unet/down_blocks")} == {2}
    assert {ranks[k] for k in ranks if k.startswith("unet/up_blocks.2")} == {8}
    assert {ranks[k] for k in ranks if k.startswith(("unet/up_blocks.1", "text_encoder"))} == {4}
    assert not any(k.startswith("unet/mid_block") for k in ranks)
    assert (af.training["block_lr"], af.training["block_rank"]) == ("down=0.5, mid=0, up.1=2", "down=2, up.2=8")
    kohya = tmp_path / "kohya.safetensors"
    assert main(["export", str(out / "adapter.safetensors"), "--format", "kohya", "--out", str(kohya)]) == 0
    with safe_open(str(kohya), "pt") as f:
        assert '"block_lr": "down=0.5, mid=0, up.1=2"' in f.metadata()["sdlora_training"]
    base = load_base("embedded")
    load_adapter(base, out / "adapter.safetensors", "ours")
    load_adapter(base, kohya, "kohya")
    back = read_adapter_file(kohya, base)  # kohya names resolved to the base's modules
    assert {k: m.rank for k, m in back.modules.items()} == ranks
    ours, theirs, plain = outputs(base, "ours"), outputs(base, "kohya"), outputs(base)
    assert (ours[1] - plain[1]).abs().max() > 1e-4  # it learned something
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))
