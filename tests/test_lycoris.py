"""LyCORIS LoHa and LoKr files (kohya layout) apply at generation as their dense deltas."""

import pytest
import torch
from safetensors.torch import save_file

from sdlora.adapter_io import kohya_table, load_adapter, read_adapter_file, write_adapter_file
from sdlora.errors import SdloraError
from sdlora.mixing import Mix
from sdlora.pipelines import load_base
from sdlora.tools.merge import resize
from tests.test_formats import outputs

LINEAR = "unet/down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # (96, 96)
CONV = "unet/down_blocks.1.resnets.0.conv1"  # (96, 48, 3, 3)


def _file(tmp_path, base):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    table = kohya_table(base)
    lin, conv = table[LINEAR], table[CONV]
    tensors = {
        # LoHa on the linear layer: rank 4, alpha 2
        f"{lin}.hada_w1_a": r(96, 4), f"{lin}.hada_w1_b": r(4, 96), f"{lin}.hada_w2_a": r(96, 4),
        f"{lin}.hada_w2_b": r(4, 96), f"{lin}.alpha": torch.tensor(2.0),
        # LoKr on the conv: w1 whole (8 x 4), w2 a rank-2 pair (12 x 2)(2 x 12*3*3), alpha 1
        f"{conv}.lokr_w1": r(8, 4), f"{conv}.lokr_w2_a": r(12, 2), f"{conv}.lokr_w2_b": r(2, 12 * 9),
        f"{conv}.alpha": torch.tensor(1.0),
    }
    path = tmp_path / "lyco.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    t = tensors
    loha = (t[f"{lin}.hada_w1_a"] @ t[f"{lin}.hada_w1_b"]) * (t[f"{lin}.hada_w2_a"] @ t[f"{lin}.hada_w2_b"]) * (2.0 / 4)
    w2 = (t[f"{conv}.lokr_w2_a"] @ t[f"{conv}.lokr_w2_b"]).reshape(12, 12, 3, 3)
    lokr = torch.einsum("ac,bdhw->abcdhw", t[f"{conv}.lokr_w1"], w2).reshape(96, 48, 3, 3) * (1.0 / 2)
    return path, {LINEAR: loha, CONV: lokr}


def test_loha_and_lokr_apply_their_dense_deltas(tmp_path):
    base = load_base("embedded")
    path, deltas = _file(tmp_path, base)
    loaded = load_adapter(base, path, "lyco")
    assert {m.method for m in loaded.file.modules.values()} == {"loha", "lokr"}
    reference = load_base("embedded")
    with torch.no_grad():
        for key, d in deltas.items():
            reference.pipe.unet.get_submodule(key.split("/", 1)[1]).weight += d
    for ours, want in zip(outputs(base, "lyco"), outputs(reference)):
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    with torch.no_grad(), base.mixer.apply(Mix({"lyco": 1.0}), mode="fused"):  # and fused into the weights
        fused = base.pipe.unet.get_submodule(LINEAR.split("/", 1)[1]).base_layer.weight.clone()
    assert torch.allclose(fused, reference.pipe.unet.get_submodule(LINEAR.split("/", 1)[1]).weight, atol=1e-6)


def test_lycoris_exports_in_its_layout_or_as_a_lora_by_resize(tmp_path):
    base = load_base("embedded")
    path, deltas = _file(tmp_path, base)
    af = read_adapter_file(path, base)
    with pytest.raises(SdloraError, match="--format kohya"):  # PEFT files have no LoHa/LoKr form
        write_adapter_file(af, tmp_path / "x.safetensors", "diffusers", base)
    for fmt in ("kohya",):  # its LyCORIS parts written back: the same deltas on reading
        again = read_adapter_file(write_adapter_file(af, tmp_path / f"{fmt}.safetensors", fmt, base), base)
        for key, want in deltas.items():
            assert again.modules[key].method == af.modules[key].method
            torch.testing.assert_close(again.modules[key].dense.reshape(want.shape), want, atol=1e-6, rtol=0)
    lora, report = resize(af, rank=96)  # full rank: exact
    assert report.relative_error < 1e-6
    out = write_adapter_file(lora, tmp_path / "lora.safetensors", "kohya", base)
    fresh = load_base("embedded")
    load_adapter(fresh, out, "l")
    reference = load_base("embedded")
    load_adapter(reference, path, "lyco")
    for a, b in zip(outputs(fresh, "l"), outputs(reference, "lyco")):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
