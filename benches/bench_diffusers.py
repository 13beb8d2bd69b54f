#!/usr/bin/env python
"""Time diffusers on the folder `lcm bench` wrote, stage by stage, and print lcm / diffusers.

    ./target/release/lcm bench --json > lcm.json                  # writes the bench folder once
    $VENV/bin/python benches/bench_diffusers.py lcm.json [--dir FOLDER]   # $VENV: torch + diffusers

The model kind (sd15, sdxl, animatediff), folder, size, frames, steps, number of runs, device and
dtype come from lcm's JSON; the same model files, seed and warm-up. On the CPU: PyTorch in float32
with the same thread count, or in bfloat16 when lcm's weights are bf16 and its CPU path multiplies
them in bf16 (`torch_dtype=torch.bfloat16`). On a GPU (`lcm bench --device cuda`): diffusers in lcm's weight dtype
(float16 by default, `torch_dtype=torch.float16` as in diffusers' LCM guide) on the same card,
each stage timed to `torch.cuda.synchronize()`; SDXL's pipeline upcasts its VAE to float32 for the
decode (`force_upcast`), so its "VAE decode" stage is timed in float32 too, as lcm runs it. sd15: StableDiffusionPipeline; sdxl: StableDiffusionXLPipeline; animatediff:
AnimateDiffPipeline with the MotionAdapter in DIR/motion_adapter, decoding frame by frame
(decode_chunk_size=1) as lcm does. LCMScheduler, guidance 1 (no CFG). Prints a Markdown table
(stage, lcm s, diffusers s, ratio, lcm GFLOP/s, % of lcm's GEMM rate) and both peak RSS.
"""

import argparse
import copy
import json
import os
import resource
import statistics
import time

import torch

PROMPT = "a photograph of an astronaut riding a horse"


DEV = "cpu"  # set from lcm's JSON in main()
DT = torch.float32


def sync():
    if DEV != "cpu":
        torch.cuda.synchronize()


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(runs, 1)):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def randn(*shape):
    return torch.randn(*shape).to(DEV, DT)


def load(cls, d, **kw):
    return cls.from_pretrained(d, dtype=DT, **kw).to(DEV)


def lcm_scheduler(pipe):
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_tiny_vae(pipe, steps, size, config):
    """The whole image with `AutoencoderTiny` (TAESD's real config, random weights, as lcm's stage)
    in the pipeline's dtype: diffusers' fast LCM recipe, `pipe.vae = AutoencoderTiny...`."""
    from diffusers import AutoencoderTiny

    here = os.path.dirname(os.path.abspath(__file__))
    cfg = json.load(open(os.path.join(here, "..", "tests", "fixtures", "vaes", "real_configs", config, "config.json")))
    tiny = AutoencoderTiny.from_config(cfg).to(DEV, DT)
    fast = copy.copy(pipe)  # a shallow copy of the pipeline: same modules, its own vae
    fast.register_modules(vae=tiny)
    x = randn(1, 4, size // 8, size // 8)
    return {
        "tiny VAE decode (TAESD)": lambda: tiny.decode(x).sample,
        f"text-to-image, {steps} LCM steps, tiny VAE": lambda: fast(
            PROMPT, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size,
            generator=torch.manual_seed(0), output_type="np"),
    }


def sd15_stages(d, size, steps):
    from diffusers import StableDiffusionPipeline

    pipe = lcm_scheduler(load(StableDiffusionPipeline, d, safety_checker=None))
    lat = size // pipe.vae_scale_factor
    pe, _ = pipe.encode_prompt(PROMPT, DEV, 1, False)
    pe2 = torch.cat(pipe.encode_prompt(PROMPT, DEV, 1, True)[::-1])  # [negative, prompt]
    x1 = randn(1, 4, lat, lat)
    x2 = torch.cat([x1, x1])
    return with_tiny_vae(pipe, steps, size, "taesd") | {
        "text encoding": lambda: pipe.encode_prompt(PROMPT, DEV, 1, False),
        "UNet step, batch 1": lambda: pipe.unet(x1, 999, encoder_hidden_states=pe).sample,
        "UNet step, batch 2 (CFG)": lambda: pipe.unet(x2, 999, encoder_hidden_states=pe2).sample,
        "VAE decode": lambda: pipe.vae.decode(x1).sample,
        f"text-to-image, {steps} LCM steps": lambda: pipe(
            PROMPT, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size,
            generator=torch.manual_seed(0), output_type="np"),
    }


def sdxl_stages(d, size, steps):
    from diffusers import StableDiffusionXLPipeline

    pipe = lcm_scheduler(load(StableDiffusionXLPipeline, d))
    tiny = with_tiny_vae(pipe, steps, size, "taesdxl")
    lat = size // pipe.vae_scale_factor
    pe, _, pooled, _ = pipe.encode_prompt(PROMPT, device=DEV, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    # Batch 2 as under CFG: force_zeros_for_empty_prompt gives zero negative embeddings.
    pe_c, neg, pooled_c, neg_pooled = pipe.encode_prompt(PROMPT, device=DEV, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=True)
    pe2, pooled2 = torch.cat([neg, pe_c]), torch.cat([neg_pooled, pooled_c])
    ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=DT, device=DEV)
    cond1 = {"text_embeds": pooled, "time_ids": ids}
    cond2 = {"text_embeds": pooled2, "time_ids": torch.cat([ids, ids])}
    x1 = randn(1, 4, lat, lat)
    x2 = torch.cat([x1, x1])
    # The pipeline decodes in float32 when the VAE's config asks (force_upcast) and the model is half.
    upcast = DT != torch.float32 and pipe.vae.config.force_upcast
    vae = pipe.vae if not upcast else copy.deepcopy(pipe.vae).to(torch.float32)
    xv = x1.to(vae.dtype)
    return tiny | {
        "text encoding": lambda: pipe.encode_prompt(PROMPT, device=DEV, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False),
        "UNet step, batch 1": lambda: pipe.unet(x1, 999, encoder_hidden_states=pe, added_cond_kwargs=cond1).sample,
        "UNet step, batch 2 (CFG)": lambda: pipe.unet(x2, 999, encoder_hidden_states=pe2,
                                                      added_cond_kwargs=cond2).sample,
        "VAE decode": lambda: vae.decode(xv).sample,
        f"text-to-image, {steps} LCM steps": lambda: pipe(
            PROMPT, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size,
            generator=torch.manual_seed(0), output_type="np"),
    }


def animatediff_stages(d, size, steps, frames):
    from diffusers import AnimateDiffPipeline, MotionAdapter

    adapter = MotionAdapter.from_pretrained(os.path.join(d, "motion_adapter"), dtype=DT)
    pipe = lcm_scheduler(load(AnimateDiffPipeline, d, motion_adapter=adapter))
    lat = size // pipe.vae_scale_factor
    pe, _ = pipe.encode_prompt(PROMPT, DEV, 1, False)
    ehs = pe.repeat_interleave(frames, dim=0)  # as AnimateDiffPipeline passes it
    x = randn(1, 4, frames, lat, lat)

    def decode():
        for k in range(frames):
            pipe.vae.decode(x[:, :, k]).sample

    return {
        f"UNet step, {frames} frames": lambda: pipe.unet(x, 999, encoder_hidden_states=ehs).sample,
        f"VAE decode, {frames} frames one by one": decode,
        f"animation, {frames} frames, {steps} LCM steps": lambda: pipe(
            PROMPT, num_frames=frames, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size,
            generator=torch.manual_seed(0), output_type="np", decode_chunk_size=1),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lcm_json")
    ap.add_argument("--dir", default=None, help="model folder (default: the one in lcm's JSON)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=None)
    a = ap.parse_args()
    lcm = json.load(open(a.lcm_json))
    kind = lcm.get("kind", "sd15")
    d = a.dir or lcm.get("dir")
    runs = a.runs or len(lcm["stages"][0]["runs"])
    global DEV, DT
    DEV = lcm.get("device", "cpu")
    # diffusers in the precision lcm multiplies in: its weight dtype on a GPU; on the CPU bfloat16
    # when lcm's CPU path multiplies bf16 weights in bf16 (e.g. avx512-bf16), else float32.
    # lcm's 8-bit mode is compared with diffusers' fastest precision on the CPU: bfloat16 where
    # the CPU multiplies it fast (AVX512-BF16 / AMX), else float32.
    dtype = lcm.get("dtype", "f32")
    cpu_bf16 = dtype in ("bf16", "int8") and lcm.get("cpu_path", "").endswith("bf16")
    dtype = "bf16" if dtype == "int8" else dtype
    DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype] if DEV != "cpu" or cpu_bf16 else torch.float32
    torch.set_num_threads(lcm["threads"])
    torch.set_grad_enabled(False)
    size, steps, frames = lcm["size"], lcm["steps"], lcm.get("frames")
    if kind == "sd15":
        stages = sd15_stages(d, size, steps)
    elif kind == "sdxl":
        stages = sdxl_stages(d, size, steps)
    elif kind == "animatediff":
        stages = animatediff_stages(d, size, steps, frames)
    else:
        raise SystemExit(f"unknown model kind {kind!r}")
    clip = f", {frames} frames" if frames else ""
    where = f"{torch.cuda.get_device_name(DEV)}, {DT}" if DEV != "cpu" else f"{lcm['threads']} threads, {DT} (lcm CPU path {lcm.get('cpu_path')})"
    print(f"{kind}: torch {torch.__version__}, {where}, {size}x{size}{clip}, {steps} steps, median of {runs}")
    # The machine's GEMM rate as PyTorch reaches it (CPU: 2048^3 f32 with the same threads; GPU:
    # 8192^3 in the dtype); "% of GEMM peak" is relative to the better of PyTorch's and lcm's.
    n = 2048 if DEV == "cpu" else 8192
    ga, gb = randn(n, n), randn(n, n)  # in DT: on the CPU with bf16 weights, torch's bf16 GEMM
    g_s, _ = timed(lambda: torch.mm(ga, gb), 2, 5)
    torch_gemm = 2 * n ** 3 / g_s / 1e9
    peak = max(torch_gemm, lcm["gemm_gflops"])
    print("| stage | lcm s | diffusers s | lcm / diffusers | lcm GFLOP/s | lcm % of GEMM peak |")
    print("|---|---|---|---|---|---|")
    for st in lcm["stages"]:
        if st["name"] not in stages:  # e.g. lcm's tiny-VAE stage: no diffusers counterpart timed here
            print(f"| {st['name']} | {st['seconds']:.3f} | – | – | {st['gflops']:.1f} | {100 * st['gflops'] / peak:.0f}% |")
            continue
        d_s, _ = timed(stages[st["name"]], a.warmup, runs)
        print(f"| {st['name']} | {st['seconds']:.3f} | {d_s:.3f} | {st['seconds'] / d_s:.2f} | {st['gflops']:.1f} | "
              f"{100 * st['gflops'] / peak:.0f}% |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mem = ""
    if DEV != "cpu":
        mem = f"; diffusers peak GPU memory {torch.cuda.max_memory_allocated(DEV) / 2**20:.0f} MB"
    print(f"peak RSS: lcm {lcm['peak_rss_mb']:.0f} MB, diffusers {rss:.0f} MB (weights {lcm['weights_mb']:.0f} MB){mem}; "
          f"GEMM {n}^3: lcm {lcm['gemm_gflops']:.1f} GFLOP/s, torch {torch_gemm:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
