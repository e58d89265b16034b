"""The file tools (resize, merge, export, inspect) on a file made for another base than the embedded one: an
SD1.5-sized LyCORIS LoKr in kohya layout, as LyCORIS writes it (issue 16). They need no base for the file's own
layout, say what base the file is for, refuse a base it does not fit, and cut large deltas by randomized SVD."""

import json

import torch
from safetensors.torch import load_file, save_file

from sdlora.cli import main


def sdlora(capsys, *args):
    """The command in this process (its exit status is main's return value): these cases are about what it
    reads and writes, and a subprocess per case would spend most of the test importing torch."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err

# kohya name -> (w1 (a, c), w2 whole or as a pair (b, r) @ (r, d[*kh*kw]), layer weight shape); out = a*b, in = c*d
# (the shapes of SD1.5's layers)
MODULES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((16, 16), ("pair", 20, 20), (320, 320)),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0": ((32, 32), ("pair", 40, 40), (1280, 1280)),
    "lora_unet_down_blocks_0_resnets_0_conv1": ((16, 16), ("pair", 20, 20 * 9), (320, 320, 3, 3)),
    "lora_unet_down_blocks_1_resnets_0_conv2": ((16, 16), ("whole", 40, 40), (640, 640, 3, 3)),
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": ((16, 16), ("pair", 40, 20), (640, 320, 1, 1)),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((24, 24), ("pair", 32, 32), (768, 768)),
}


def _sd15_lokr(path):
    """A LoKr file, each module's dense delta (the layer's weight shape), as LyCORIS's LoKr computes it:
    kron(w1, w2_a @ w2_b) * alpha / r with a w2 pair, kron(w1, w2) with a whole w2; and the delta's singular
    values: those of a Kronecker product are the products of its factors' (w2 flattened to (b, d*kh*kw))."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    tensors, deltas, spectra = {}, {}, {}
    for name, ((a, c), (kind, b, d), shape) in MODULES.items():
        w1 = r(a, c)
        tensors[f"{name}.lokr_w1"] = w1
        if kind == "pair":
            w2a, w2b = r(b, 4), r(4, d)
            tensors |= {f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b, f"{name}.alpha": torch.tensor(2.0)}
            w2 = (w2a @ w2b).reshape(b, shape[1] // c, *shape[2:]) * 0.5
        else:
            w2 = r(b, d, *shape[2:])
            tensors[f"{name}.lokr_w2"] = w2
        spectra[name] = torch.outer(torch.linalg.svdvals(w1.double()), torch.linalg.svdvals(w2.flatten(1).double()))
        deltas[name] = torch.kron(w1.reshape(a, c, *([1, 1] if len(shape) == 4 else [])), w2)
        assert deltas[name].shape == shape
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1",
                                            "ss_network_args": '{"algo": "lokr"}'})
    return deltas, spectra


def test_resize_without_a_base_keeps_kohya_names_and_cuts_near_the_best_rank(tmp_path, capsys):
    deltas, spectra = _sd15_lokr(tmp_path / "sd15-lokr.safetensors")
    out = tmp_path / "r4.safetensors"
    code, _, err = sdlora(capsys, "resize", str(tmp_path / "sd15-lokr.safetensors"), "--rank", "4", "--out", str(out))
    assert code == 0, err
    assert "randomized SVD" in err and "relative error" in err
    tensors = load_file(str(out))
    for name, delta in deltas.items():
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert down.shape[0] == 4 and down.dim() == delta.dim()  # convolutions keep their kernel: (4, in, kh, kw)
        scale = float(tensors[f"{name}.alpha"]) / 4
        ours = (up.flatten(1) @ down.flatten(1)) * scale
        d = delta.flatten(1).double()
        sv = spectra[name].flatten().sort(descending=True).values
        best = sv[4:].pow(2).sum().sqrt()  # Eckart-Young: the least error of any rank-4 matrix
        err = (ours.double() - d).norm()
        assert err <= best * 1.02 + 1e-6, name
    # The written file is kohya layout and says the family it came with.
    assert json.loads(sdlora(capsys, "inspect", str(out), "--json")[1])["base_family"] == "sd1"


def test_a_base_the_file_does_not_fit_is_refused_naming_the_files_size(tmp_path, capsys):
    src = tmp_path / "sd15-lokr.safetensors"
    _sd15_lokr(src)
    code, out, _ = sdlora(capsys, "inspect", str(src))
    assert code == 0 and "SD1.x's size" in out and "UNet layers up to 1280 wide" in out
    for args in (["resize", str(src), "--rank", "4", "--base", "embedded"],
                 ["resize", str(src), "--rank", "4", "--format", "sdlora"],  # sdlora names need a base: the embedded
                 ["export", str(src), "--format", "diffusers"],
                 ["merge", f"{src}:0.5", "--format", "sdlora"]):
        out = tmp_path / "out.safetensors"
        code, _, err = sdlora(capsys, *args, "--out", str(out))
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.endswith(" modules")]  # less tell()'s line
        assert code == 2 and "modules do not fit this sd1 base" in err and "SD1.x's size" in err, err
        assert not out.exists() and len(lines) == 1, err
