"""Benchmark `lcm serve` on the tiny fixture model (run by hand, never in CI; standard library only).

    cargo build --release
    python3 benches/bench_server.py [--steps 4] [--size 32] [--seq 30] [--clients 100] [--jobs 300]
                                    [--job-ttl 600]

Starts ./target/release/lcm serve --queue 128 on a free port with tests/fixtures/models/tiny-lcm
(no preview VAE) and measures:

(a) server overhead per job: N sequential native jobs, each timed from POST /api/v1/jobs through
    its events stream ending with `succeeded` to GET /api/v1/jobs/ID/images/0 (the PNG), against
    the executor's own job time over the same jobs (lcm_job_duration_seconds_sum / _count from
    /metrics: start of the job to its result, i.e. the generation and PNG encoding in-process);
(b) throughput: `--jobs` jobs by `--clients` concurrent client threads (each submits, waits on
    the events stream, fetches the image, repeats; a 429 is retried after Retry-After);
(c) the server's VmRSS (/proc/PID/status) after 100 and after 1000 finished jobs (finished jobs,
    with their images, stay in memory for --job-ttl seconds: compare --job-ttl 1 to tell a leak
    from that retention).
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def request(self, method, path, body=None):
        headers = {"Content-Type": "application/json"} if body is not None else {}
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                r = self.conn.getresponse()
                return r.status, r.getheaders(), r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
                if attempt:
                    raise

    def job(self, body):
        """Submit, wait for the end of the events stream, fetch image 0. Returns (seconds, 429s)."""
        rejected = 0
        t0 = time.perf_counter()
        while True:
            status, headers, data = self.request("POST", "/api/v1/jobs", body)
            if status != 429:
                break
            rejected += 1
            time.sleep(float(dict(headers).get("Retry-After", "0.1")) / 10)
        assert status == 202, (status, data)
        jid = json.loads(data)["id"]
        status, _, events = self.request("GET", f"/api/v1/jobs/{jid}/events")
        assert status == 200 and b"event: succeeded" in events, events[-300:]
        status, _, png = self.request("GET", f"/api/v1/jobs/{jid}/images/0")
        assert status == 200 and png[:4] == b"\x89PNG", status
        return time.perf_counter() - t0, rejected


def metrics(port):
    _, _, data = Client(port).request("GET", "/metrics")
    out = {}
    for line in data.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def concurrent(port, body, clients, jobs):
    left = [jobs]
    lock = threading.Lock()
    times, rejected = [], [0]

    def worker():
        c = Client(port)
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            t, r = c.job(body)
            with lock:
                times.append(t)
                rejected[0] += r

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, times, rejected[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seq", type=int, default=30)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--job-ttl", type=int, default=600, help="the server's --job-ttl (600, its default)")
    args = ap.parse_args()

    port = free_port()
    server = subprocess.Popen(
        [os.path.join(ROOT, "target", "release", "lcm"), "serve", "--port", str(port), "--queue", "128",
         "--job-ttl", str(args.job_ttl),
         "--model", os.path.join(ROOT, "tests", "fixtures", "models", "tiny-lcm")],
        stdout=subprocess.DEVNULL,
    )
    body = {"prompt": "a red fox in the snow", "num_inference_steps": args.steps, "seed": 0,
            "width": args.size, "height": args.size}
    try:
        for _ in range(300):
            try:
                if Client(port).request("GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        print(f"server pid {server.pid}, RSS after load {rss_mb(server.pid):.1f} MB")
        c = Client(port)
        done = 0
        for _ in range(5):  # warm-up
            c.job(body)
        done += 5

        # (a) sequential jobs against the executor's own job time.
        m0 = metrics(port)
        walls = [c.job(body)[0] for _ in range(args.seq)]
        done += args.seq
        m1 = metrics(port)
        n = m1["lcm_job_duration_seconds_count"] - m0["lcm_job_duration_seconds_count"]
        exec_mean = (m1["lcm_job_duration_seconds_sum"] - m0["lcm_job_duration_seconds_sum"]) / n
        wall_med, wall_mean = statistics.median(walls), statistics.mean(walls)
        print(f"(a) {args.seq} sequential jobs ({args.size}x{args.size}, {args.steps} steps): wall median "
              f"{wall_med * 1e3:.2f} ms, mean {wall_mean * 1e3:.2f} ms; executor job time mean "
              f"{exec_mean * 1e3:.2f} ms; overhead (mean wall - mean executor) {(wall_mean - exec_mean) * 1e3:.2f} ms"
              f" per job ({(wall_mean - exec_mean) / wall_mean * 100:.1f}%)")

        while done < 100:
            c.job(body)
            done += 1
        rss100 = rss_mb(server.pid)
        print(f"(c) RSS after {done} jobs: {rss100:.1f} MB")

        # (b) concurrent clients.
        secs, times, rejected = concurrent(port, body, args.clients, args.jobs)
        done += args.jobs
        print(f"(b) {args.jobs} jobs, {args.clients} clients, --queue 128: {secs:.2f} s, "
              f"{args.jobs / secs:.1f} jobs/s; per-job wall median {statistics.median(times) * 1e3:.0f} ms, "
              f"max {max(times) * 1e3:.0f} ms; 429s {rejected}")
        print(f"    sequential rate for comparison: {1 / wall_mean:.1f} jobs/s")

        secs, _, _ = concurrent(port, body, 16, 1000 - done)
        done = 1000
        rss1000 = rss_mb(server.pid)
        print(f"(c) RSS after {done} jobs: {rss1000:.1f} MB ({(rss1000 / rss100 - 1) * 100:+.1f}% from 100 jobs)")
        m = metrics(port)
        print("    jobs succeeded per /metrics:", int(m.get('lcm_jobs_total{outcome="succeeded"}', -1)))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
