#!/usr/bin/env python
"""Time diffusers on the folder `lcm bench` wrote, stage by stage, and print lcm / diffusers.

    ./target/release/lcm bench --json > lcm.json          # writes /tmp/lcm-bench-sd15 once
    /work/venv/bin/python benches/bench_diffusers.py lcm.json [--dir /tmp/lcm-bench-sd15]

Same model files, size, steps, seed, warm-up and number of runs as the lcm run (read from its
JSON); PyTorch on the CPU in float32 with the same thread count. Prints a Markdown table (stage,
lcm s, diffusers s, ratio, lcm GFLOP/s, % of lcm's GEMM rate) and diffusers' peak RSS.
"""

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

import torch
from diffusers import LCMScheduler, StableDiffusionPipeline


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(runs, 1)):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lcm_json")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lcm-bench-sd15"))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=None)
    a = ap.parse_args()
    lcm = json.load(open(a.lcm_json))
    runs = a.runs or len(lcm["stages"][0]["runs"])
    torch.set_num_threads(lcm["threads"])
    torch.set_grad_enabled(False)
    pipe = StableDiffusionPipeline.from_pretrained(a.dir, dtype=torch.float32, safety_checker=None)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size, steps = lcm["size"], lcm["steps"]
    prompt = "a photograph of an astronaut riding a horse"
    lat = size // pipe.vae_scale_factor
    pe, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    x1 = torch.randn(1, 4, lat, lat)
    x2, pe2 = torch.cat([x1, x1]), torch.cat([pe, pe])
    stages = {
        "text encoding": lambda: pipe.encode_prompt(prompt, "cpu", 1, False),
        "UNet step, batch 1": lambda: pipe.unet(x1, 999, encoder_hidden_states=pe).sample,
        "UNet step, batch 2 (CFG)": lambda: pipe.unet(x2, 999, encoder_hidden_states=pe2).sample,
        "VAE decode": lambda: pipe.vae.decode(x1).sample,
        f"text-to-image, {steps} LCM steps": lambda: pipe(
            prompt, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size,
            generator=torch.manual_seed(0), output_type="np"),
    }
    print(f"torch {torch.__version__}, {lcm['threads']} threads, {size}x{size}, {steps} steps, median of {runs}")
    print("| stage | lcm s | diffusers s | lcm / diffusers | lcm GFLOP/s | lcm % of GEMM peak |")
    print("|---|---|---|---|---|---|")
    for st in lcm["stages"]:
        d, _ = timed(stages[st["name"]], a.warmup, runs)
        print(f"| {st['name']} | {st['seconds']:.3f} | {d:.3f} | {st['seconds'] / d:.2f} | {st['gflops']:.1f} | "
              f"{100 * st['gemm_fraction']:.0f}% |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: lcm {lcm['peak_rss_mb']:.0f} MB, diffusers {rss:.0f} MB; lcm FP32 GEMM {lcm['gemm_gflops']:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
