# Run: python -m tests.bench.sd15_lokr_resize (about a minute here; not part of make bench)
"""A realistic SD1.5 LoKr: LyCORIS 4.1.3's own LoKr network (preset attn-mlp, dim 16, factor 8; its "full" preset names time_embedding twice on a diffusers UNet and refuses to build) on the real SD1.5 UNet
and text-encoder architectures (random weights), every parameter random, saved by LyCORIS; then time
`sdlora resize FILE --rank 4` without a base, and against the embedded base."""
import subprocess, sys, tempfile, time, torch
from pathlib import Path
OUT = Path(tempfile.mkdtemp())
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from tests.bench.common import sd15_unet, sd15_text_encoder
from lycoris.kohya import create_network
unet, te = sd15_unet(), sd15_text_encoder()
net = create_network(1.0, 16, 8.0, None, te, unet, preset="attn-mlp", algo="lokr", factor=8)
net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in net.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
names = {m.lora_name for m in net.unet_loras + net.text_encoder_loras}
net.save_weights(str(OUT / "sd15-lokr.safetensors"), torch.float16, {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
print("modules", len(names), flush=True)
del unet, te, net
for extra in ([], ["--base", "embedded"]):
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "sdlora", "resize", str(OUT / "sd15-lokr.safetensors"), "--rank", "4", "--out", str(OUT / "sd15-r4.safetensors"), *extra], capture_output=True, text=True)
    print(extra, p.returncode, f"{time.time() - t:.1f} s", p.stderr.strip()[-600:], flush=True)
