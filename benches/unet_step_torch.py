"""PyTorch/diffusers counterpart of benches/unet_step.rs (run by hand, same machine).

$VENV/bin/python benches/unet_step_torch.py sd15 64 1   # $VENV: torch + diffusers
"""
import json, sys, time
from pathlib import Path
import torch
from diffusers import UNet2DConditionModel

model, latent, batch = (sys.argv[1:] + ["sd15", "64", "1"][len(sys.argv[1:]):])[:3]
latent, batch = int(latent), int(batch)
cfg = json.loads((Path(__file__).parent.parent / "tests/fixtures/real_configs" / model / "unet/config.json").read_text())
torch.manual_seed(0)
unet = UNet2DConditionModel.from_config(cfg).eval()
x = torch.randn(batch, cfg["in_channels"], latent, latent)
ehs = torch.randn(batch, 77, cfg["cross_attention_dim"])
kw = {}
if cfg.get("addition_embed_type") == "text_time":
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.ones(batch, 6)}
if cfg.get("time_cond_proj_dim"):
    kw["timestep_cond"] = torch.randn(batch, cfg["time_cond_proj_dim"])
times = []
with torch.inference_mode():
    for _ in range(3):
        t = time.perf_counter()
        unet(x, 999, ehs, **kw)
        times.append(time.perf_counter() - t)
times.sort()
print(f"{model} UNet step (torch {torch.__version__}, {torch.get_num_threads()} threads), latent {latent}x{latent}, batch {batch}: median {times[1]:.2f}s (runs {[round(t, 2) for t in times]})")
