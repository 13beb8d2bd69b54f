"""Check `lcm serve` against real, unmodified clients (run by hand, never in CI).

The official `openai` Python library (Images: generate with b64_json and url, edit with a
mask, a bad request) and a SillyTavern-like AUTOMATIC1111 sequence with `requests` (options,
sd-models, switching the checkpoint, txt2img while another thread polls progress, interrupt).

    python3 -m venv /tmp/oaivenv && /tmp/oaivenv/bin/pip install openai requests
    cargo build --release
    /tmp/oaivenv/bin/python benches/server_clients.py        # starts ./target/release/lcm serve

It starts the server on a free port with the tiny fixture models (tests/fixtures), prints one
line per check and exits non-zero on the first failure.
"""

import base64
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import openai
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")


def png(width, height, pixel):
    """A PNG (RGBA) from pixel(x, y) -> (r, g, b, a), standard library only."""
    raw = b"".join(
        b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height)
    )

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def is_png(data):
    return data[:8] == b"\x89PNG\r\n\x1a\n"


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + (": " + detail if detail else ""), flush=True)
    if not cond:
        raise SystemExit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            os.path.join(ROOT, "target", "release", "lcm"), "serve", "--port", str(port),
            "--model", os.path.join(FIX, "models", "tiny-lcm"),
            "--model", os.path.join(FIX, "models", "tiny-sd"),
            "--preview-vae", os.path.join(FIX, "vaes", "taesd-tiny"),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                if requests.get(base + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        run(base)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("all checks passed")


def run(base):
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    check("openai models.list", "tiny-lcm" in models, str(models))

    r = client.images.generate(model="tiny-lcm", prompt="a red fox", n=2, size="32x32",
                               extra_body={"seed": 1, "num_inference_steps": 2})
    imgs = [base64.b64decode(d.b64_json) for d in r.data]
    check("openai images.generate n=2 b64_json", len(imgs) == 2 and all(is_png(i) for i in imgs),
          f"{len(imgs)} images, {[len(i) for i in imgs]} bytes")

    r = client.images.generate(model="tiny-lcm", prompt="a red fox", n=1, size="32x32",
                               response_format="url", extra_body={"seed": 1, "num_inference_steps": 2})
    url = r.data[0].url
    body = requests.get(url, timeout=30)
    check("openai response_format=url fetches", body.ok and is_png(body.content), f"{url} -> {body.status_code}")

    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "photo.png")
        mask = os.path.join(tmp, "mask.png")
        with open(image, "wb") as f:
            f.write(png(32, 32, lambda x, y: (x * 8, y * 8, 128, 255)))
        with open(mask, "wb") as f:  # transparent left half = repaint
            f.write(png(32, 32, lambda x, y: (0, 0, 0, 0 if x < 16 else 255)))
        with open(image, "rb") as im, open(mask, "rb") as mk:
            r = client.images.edit(model="tiny-lcm", image=im, mask=mk, prompt="a tiger",
                                   extra_body={"seed": 2, "num_inference_steps": 2})
        data = base64.b64decode(r.data[0].b64_json)
        check("openai images.edit with mask", is_png(data), f"{len(data)} bytes")

    try:
        client.images.generate(model="tiny-lcm", prompt="x", size="33x7")
        check("openai bad size raises BadRequestError", False, "no error")
    except openai.BadRequestError as e:
        check("openai bad size raises BadRequestError", True, f"{e.status_code}: {e.message}")
    try:
        client.images.generate(model="no-such-model", prompt="x")
        check("openai unknown model raises", False, "no error")
    except openai.APIStatusError as e:
        check("openai unknown model raises " + type(e).__name__, e.status_code in (400, 404), e.message)

    # SillyTavern-like AUTOMATIC1111 sequence.
    s = requests.Session()
    opts = s.get(base + "/sdapi/v1/options", timeout=10)
    check("GET /sdapi/v1/options", opts.ok, "sd_model_checkpoint=" + str(opts.json().get("sd_model_checkpoint")))
    sd_models = s.get(base + "/sdapi/v1/sd-models", timeout=10).json()
    titles = [m["title"] for m in sd_models]
    check("GET /sdapi/v1/sd-models", len(titles) == 2, str(titles))
    target = [t for t in titles if "tiny-sd" in t and "lcm" not in t][0]
    r = s.post(base + "/sdapi/v1/options", json={"sd_model_checkpoint": target}, timeout=10)
    now = s.get(base + "/sdapi/v1/options", timeout=10).json().get("sd_model_checkpoint")
    check("POST /sdapi/v1/options sd_model_checkpoint", r.ok and now == target, f"{r.status_code}, now {now}")
    s.post(base + "/sdapi/v1/options", json={"sd_model_checkpoint": titles[0]}, timeout=10)

    progress, stop = [], threading.Event()

    def poll():
        p = requests.Session()
        while not stop.is_set():
            j = p.get(base + "/sdapi/v1/progress", timeout=10).json()
            progress.append((j.get("progress"), j.get("state", {}).get("sampling_step"), bool(j.get("current_image"))))
            time.sleep(0.02)

    t = threading.Thread(target=poll)
    t.start()
    r = s.post(base + "/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 8, "seed": 3, "width": 32,
                                                "height": 32, "batch_size": 2}, timeout=120)
    stop.set()
    t.join()
    images = r.json().get("images", []) if r.ok else []
    check("POST /sdapi/v1/txt2img", r.ok and len(images) == 2 and all(is_png(base64.b64decode(i)) for i in images),
          f"{r.status_code}, {len(images)} images, info {len(r.json().get('info', ''))} chars")
    check("GET /sdapi/v1/progress during txt2img", any(p[0] for p in progress),
          f"{len(progress)} polls, {sum(1 for p in progress if p[0])} with progress > 0, "
          f"{sum(1 for p in progress if p[2])} with current_image")

    # Interrupt a long generation from another thread.
    result = {}

    def long_job():
        result["r"] = requests.post(base + "/sdapi/v1/txt2img", json={"prompt": "slow", "steps": 50, "width": 256,
                                                                      "height": 256, "batch_size": 8}, timeout=300)

    t = threading.Thread(target=long_job)
    t0 = time.time()
    t.start()
    for _ in range(500):
        j = s.get(base + "/sdapi/v1/progress", timeout=10).json()
        if j.get("progress"):
            break
        time.sleep(0.02)
    i = s.post(base + "/sdapi/v1/interrupt", timeout=10)
    t.join()
    r = result["r"]
    check("POST /sdapi/v1/interrupt", i.ok, f"interrupt {i.status_code}; txt2img answered {r.status_code} "
          f"after {time.time() - t0:.2f}s: {r.text[:120]}")
    j = s.get(base + "/sdapi/v1/progress", timeout=10).json()
    check("progress idle after interrupt", not j.get("progress"), str({k: j[k] for k in ("progress", "state") if k in j}))


if __name__ == "__main__":
    main()
