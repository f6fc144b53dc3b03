"""Throughput of ``staralign serve`` under 1 and under C concurrent clients, with and without batching.

For each ``--max-batch`` value the script starts a real ``staralign serve`` (a
subprocess on 127.0.0.1, port chosen by the system), warms it up, then sends the
same ``--requests`` uploads once from one client and once spread over each
``--clients`` count (one keep-alive connection per client, all clients started
together).  It prints one JSON object: per server and client count the wall time,
requests per second, latency percentiles and the ratio to one client; plus the
machine (cores usable, load average before and after) so figures are read with
their context.

    PYTHONPATH=. python benchmarks/web_throughput.py --weights run/best.safetensors \\
        --requests 64 --clients 8 --max-batch 1 8

``--max-batch none`` starts the server without the flag (a checkout that predates
batching: set ``--pythonpath`` to it for a before/after comparison).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent


def faces(count: int, size: int) -> list[bytes]:
    """``count`` different synthetic faces, JPEG-encoded like photos from a browser."""
    sys.path.insert(0, str(REPO))
    from staralign.data.synth import render_face

    out = []
    for seed in range(count):
        image = render_face(np.random.default_rng(seed), size)[0]
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        out.append(buf.tobytes())
    return out


class Server:
    """``python -m staralign serve`` in a subprocess; the port is read from its start-up line."""

    def __init__(self, weights: str, max_batch: str, pythonpath: str, detector: str, threads: int | None) -> None:
        cmd = [sys.executable, "-m", "staralign", "serve", "--weights", weights, "--port", "0",
               "--detector", detector, "--device", "cpu"]
        if max_batch != "none":
            cmd += ["--max-batch", max_batch]
        env = {**os.environ, "PYTHONPATH": pythonpath}
        if threads:  # torch and onnxruntime read these at start-up
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.monotonic() + 120
        self.port = 0
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            found = re.search(r"open http://127\.0\.0\.1:(\d+)/", line)
            if found:
                self.port = int(found.group(1))
                break
        if not self.port:
            self.stop()
            raise SystemExit(f"the server did not start: {' '.join(cmd)}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained
        while True:  # the line comes before the socket listens: wait for an answer
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", "/api/info")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"the server did not answer: {' '.join(cmd)}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_client(port: int, uploads: list[bytes], latencies: list[float], errors: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        _send_all(conn, uploads, latencies, errors)
    except (OSError, http.client.HTTPException) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def _send_all(conn: http.client.HTTPConnection, uploads: list[bytes], latencies: list[float],
              errors: list[str]) -> None:
    for data in uploads:
        start = time.perf_counter()
        conn.request("POST", "/api/landmarks", body=data, headers={"content-type": "image/jpeg"})
        r = conn.getresponse()
        body = r.read()
        latencies.append(time.perf_counter() - start)
        if r.status != 200:
            errors.append(f"{r.status}: {body[:200]!r}")
        elif not json.loads(body)["inputs"][0]["faces"]:
            errors.append("no face in the answer")


def run_clients(port: int, images: list[bytes], requests: int, clients: int) -> dict:
    """``requests`` uploads split over ``clients`` concurrent keep-alive connections."""
    shares = [[images[(c + k * clients) % len(images)] for k in range(len(range(c, requests, clients)))]
              for c in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    threads = [threading.Thread(target=one_client, args=(port, share, latencies, errors)) for share in shares]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if not latencies:
        raise SystemExit(f"no request succeeded: {errors[:3]}")
    lat = np.sort(np.asarray(latencies)) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": errors[:5], "error_count": len(errors),
            "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 3),
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1),
                           "p90": round(float(np.percentile(lat, 90)), 1),
                           "max": round(float(lat[-1]), 1)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", required=True, help="model file the server loads")
    p.add_argument("--requests", type=int, default=64, help="uploads per measurement")
    p.add_argument("--clients", type=int, nargs="+", default=[8], help="concurrent client counts to compare with 1")
    p.add_argument("--max-batch", nargs="+", default=["1", "8"], help="servers to compare ('none': no flag)")
    p.add_argument("--size", type=int, default=256, help="side of the uploaded face images, pixels")
    p.add_argument("--detector", default="none", help="the server's face detector")
    p.add_argument("--warmup", type=int, default=4, help="uploads sent before measuring")
    p.add_argument("--pythonpath", default=str(REPO), help="checkout the server runs from")
    p.add_argument("--threads", type=int, default=None,
                   help="the server's intra-op threads (OMP_NUM_THREADS); default: the libraries' own choice")
    p.add_argument("--repeat", type=int, default=1, help="rounds; servers alternate within each round")
    args = p.parse_args(argv)

    images = faces(8, args.size)
    result: dict = {"benchmark": "web_throughput", "weights": Path(args.weights).name, "requests": args.requests,
                    "image_side": args.size, "detector": args.detector,
                    "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "threads": args.threads, "load_before": [round(v, 2) for v in os.getloadavg()], "rounds": []}
    for round_index in range(args.repeat):
        servers = []
        for max_batch in args.max_batch:
            server = Server(args.weights, max_batch, args.pythonpath, args.detector, args.threads)
            try:
                run_clients(server.port, images, args.warmup, 1)
                runs = [run_clients(server.port, images, args.requests, 1)]
                runs += [run_clients(server.port, images, args.requests, c) for c in args.clients]
            finally:
                server.stop()
            for r in runs:
                r["throughput_vs_1_client"] = round(r["requests_per_s"] / runs[0]["requests_per_s"], 3)
            servers.append({"max_batch": max_batch, "runs": runs})
            print(f"round {round_index + 1} max_batch={max_batch}: " + ", ".join(
                f"{r['clients']} client(s) {r['requests_per_s']:.2f} req/s p50 {r['latency_ms']['p50']:.0f} ms"
                for r in runs), file=sys.stderr, flush=True)
        result["rounds"].append(servers)
    # Medians over the rounds: requests per second per server and client count, and the ratio to 1 client.
    summary = {}
    for k, max_batch in enumerate(args.max_batch):
        for j, clients in enumerate([1, *args.clients]):
            rates = [rnd[k]["runs"][j]["requests_per_s"] for rnd in result["rounds"]]
            ratios = [rnd[k]["runs"][j]["throughput_vs_1_client"] for rnd in result["rounds"]]
            summary[f"max_batch={max_batch} clients={clients}"] = {
                "requests_per_s_median": round(float(np.median(rates)), 3),
                "vs_1_client_median": round(float(np.median(ratios)), 3)}
    result["summary"] = summary
    result["load_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
