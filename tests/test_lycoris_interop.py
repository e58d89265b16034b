"""Files made by LyCORIS itself (lycoris-lora 4.1.3, its kohya-layout network) apply as LyCORIS merges them,
on every tensor, including modules outside our own target presets (issue 16)."""

import torch

from sdlora.adapter_io import load_adapter
from sdlora.mixing import Mix
from sdlora.pipelines import load_base
from sdlora.tools.bake import bake


def _lycoris_file(tmp_path, preset: str, algo: str):
    """A LyCORIS network on a fresh embedded base, every parameter random (its up weights start at zero), saved
    by LyCORIS; returns the path and LyCORIS's own merge of it: {role: state dict of the merged model}."""
    from lycoris.kohya import LycorisNetworkKohya, create_network

    saved = {k: getattr(LycorisNetworkKohya, k) for k in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE",
                                                          "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
                                                          "TEXT_ENCODER_TARGET_REPLACE_NAME")}
    try:  # apply_preset sets class attributes: put them back for whoever builds a network next
        reference = load_base("embedded")
        unet, te = reference.pipe.unet, reference.pipe.text_encoder
        net = create_network(1.0, 4, 2.0, None, te, unet, preset=preset, algo=algo, conv_dim=2, conv_alpha=1.0)
    finally:
        for k, v in saved.items():
            setattr(LycorisNetworkKohya, k, v)
    net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)  # registers its modules (to save them)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path / f"{preset}-{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya",
                                                "ss_network_args": f'{{"algo": "{algo}", "preset": "{preset}"}}'})
    names = {m.lora_name for m in net.unet_loras + net.text_encoder_loras}
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    net.merge_to(te, unet, weights, torch.float32, "cpu")
    merged = {"unet": unet.state_dict(), "text_encoder": te.state_dict()}
    return path, merged, names


def test_attn_mlp_locon_bakes_to_lycoris_merge_on_every_tensor(tmp_path):
    path, merged, lycoris_modules = _lycoris_file(tmp_path, "attn-mlp", "locon")
    # The preset reaches beyond our presets: the time embedding's two linears are among its modules.
    assert {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2"} <= lycoris_modules
    base = load_base("embedded")
    loaded = load_adapter(base, path, "lyco")
    assert loaded.warnings == [] and loaded.layers == len(lycoris_modules)
    report = bake(base, Mix({"lyco": 1.0}), tmp_path / "baked")
    assert report.layers == len(lycoris_modules)
    baked = load_base(str(tmp_path / "baked"))
    changed = 0
    for role in ("unet", "text_encoder"):
        ours = baked.models()[role].state_dict()
        assert set(ours) == set(merged[role])
        plain = load_base("embedded").models()[role].state_dict()
        for key, want in merged[role].items():
            torch.testing.assert_close(ours[key], want, atol=2e-6, rtol=0, msg=f"{role} {key}")
            changed += not torch.equal(want, plain[key])
    assert changed == len(lycoris_modules)  # every module LyCORIS adapted changed one weight, and so did ours
    t = baked.pipe.unet.time_embedding.linear_1.weight
    assert not torch.equal(t, load_base("embedded").pipe.unet.time_embedding.linear_1.weight)


def test_sdxl_kohya_file_adapts_embeddings_and_outer_convs(tiny_sdxl_dir, tmp_path):
    """Other trainers' SDXL files may adapt any Linear or Conv2d; under SGM names those are label_emb (SDXL's
    add_embedding), time_embed, input_blocks.0.0 (conv_in) and out.2 (conv_out). Each applies as W0 + up @ down
    * alpha / rank, as kohya's merge_lora writes it."""
    from safetensors.torch import save_file

    names = {"lora_unet_label_emb_0_0": "add_embedding.linear_1", "lora_unet_time_embed_2": "time_embedding.linear_2",
             "lora_unet_input_blocks_0_0": "conv_in", "lora_unet_out_2": "conv_out"}
    base = load_base(str(tiny_sdxl_dir))
    unet = base.pipe.unet
    g = torch.Generator().manual_seed(1)
    tensors, want = {}, {}
    for kohya_name, path in names.items():
        w = unet.get_submodule(path).weight  # (out, in) or (out, in, kh, kw)
        down = torch.randn(2, *w.shape[1:], generator=g) * 0.1  # (2, in[, kh, kw])
        up = torch.randn(w.shape[0], 2, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.1
        tensors |= {f"{kohya_name}.lora_down.weight": down, f"{kohya_name}.lora_up.weight": up,
                    f"{kohya_name}.alpha": torch.tensor(1.0)}
        want[path] = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * 0.5
    file = tmp_path / "outer.safetensors"
    save_file(tensors, str(file), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    loaded = load_adapter(base, file, "outer")
    assert loaded.warnings == [] and loaded.layers == len(names)
    with torch.no_grad(), base.mixer.apply(Mix({"outer": 1.0}), mode="fused"):
        for path, w in want.items():
            torch.testing.assert_close(unet.get_submodule(path).base_layer.weight, w, atol=1e-6, rtol=0)
