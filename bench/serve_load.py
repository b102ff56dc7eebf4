"""Serving load benchmark: what dynamic batching buys, what HTTP / gRPC cost, and a swap under load.

    python bench/serve_load.py [--duration 6] [--concurrency 1 8 64] [--checkpoint PATH] [--checkpoint-b PATH]

One checkpoint (default: a freshly initialised dcgan-digits generator, 16x16, width 64; the weights do
not change the cost), one model replica, requests of --images-per-request images:
  (a) in-process GeneratorPipeline.generate on batches of `concurrency` images (the ceiling: no Serve),
  (b) Serve HTTP with @serve.batch (max_batch_images 64), (c) Serve HTTP without batching (max 1),
  (d) Serve gRPC with batching, (e) Serve gRPC without batching,
  (p) the baseline: one plain uvicorn + FastAPI process with the model in it, the same JSON envelope
      (base64 PNGs with their tEXt chunks), no batching, no Ray;
at each concurrency: images/s, p50/p99 latency (ms), errors; ratios (b)/(c) and (d)/(b) at the highest
concurrency and (b)/(a), and Serve against the plain server at every concurrency (the issue's targets:
HTTP >= 0.5x its requests/s at 8 and 64, p50 at concurrency 1 <= 3x).
Then the swap check: load at concurrency 16 while the checkpoint is swapped to a second one; expects zero
failed requests and responses switching version. --device cuda puts the model on the GPU in every mode
(Serve: replica_gpus 1).
--overload then sends open-loop load (a fixed arrival rate) at 0.5x and 4x the sustainable rate with the shipped
queue bounds: admitted p99 at 4x against 0.5x (target <= 2x), how fast the rest are shed, how many hung.
--ingress haproxy puts HAProxy in front instead of Ray's proxy actors (as `aigc-ray serve --ingress haproxy`).
--niceness runs Ray's workers and the plain server at the same niceness (default 0, as `aigc-ray serve` does;
Ray's own default for workers is 15, which on a busy machine starves Serve against a nice-0 baseline).
Writes bench/results/serve_load.json. The load generator runs on the same machine (asyncio clients).

    python bench/serve_load.py --text [--text-config gpt-stdlib] [--duration 6] [--concurrency 1 8] [--max-new-tokens 128]

--text measures text completion instead, on a freshly initialised checkpoint of a shipped text config (default
gpt-stdlib; the weights do not change the cost) served alone (so in the ingress replica, no second hop), one
replica: every request continues the same prompt (default: the first 64 bytes of the stdlib corpus) by
--max-new-tokens bytes at temperature 0.8, each with its own seed, in closed loops of `concurrency` clients:
  (a) the plain PyTorch loop in this process: TextPipeline.stream (what the replica calls), one thread per
      concurrency slot, each running its requests one after another (torch at 1 thread, as the replica),
  (b) Serve HTTP POST /v1/complete with "stream": true (server-sent events),
  (c) Serve HTTP POST /v1/complete without streaming (one JSON answer),
  (d) Serve gRPC aigc.v1.Generator/Complete (server streaming);
at each concurrency: tokens/s (all new tokens of the cell / its seconds), time to first token (the first
piece: (a) the first piece the pipeline yields, (b) the first `data` event, (d) the first chunk with text;
p50/p99), each stream's own rate after its first token (p50), total latency p50/p99, errors; and Serve / plain
for tokens/s and time to first token at every concurrency. Writes bench/results/serve_load_text.json.
"""

import argparse
import asyncio
import json
import os
import shlex
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_checkpoint(path: Path, seed: int, image_size: int = 16, channels: int = 1) -> str:
    import torch

    from aigc_ray.config import load_config
    from aigc_ray.models import build_generator
    from aigc_ray.models.checkpoint import save_checkpoint

    cfg = load_config("dcgan-digits").with_overrides({"data.image_size": image_size, "model.image_size": image_size,
                                                      "data.channels": channels, "model.channels": channels})
    torch.manual_seed(seed)
    model = build_generator(cfg.model)
    save_checkpoint(path, experiment=cfg, served_state=model.state_dict(), step=seed, epoch=0, ema=True, dataset={})
    return str(path)


TEXT_CONFIGS = ("gpt-stdlib", "gru-stdlib")


def make_text_checkpoint(path: Path, config: str, seed: int) -> str:
    """A freshly initialised text checkpoint of a shipped text config, written by the product's own writer."""
    import torch

    from aigc_ray.config import load_config
    from aigc_ray.models.text_checkpoint import save_text_checkpoint
    from aigc_ray.models.text_registry import build_text_model

    cfg = load_config(config)
    torch.manual_seed(seed)
    model = build_text_model(cfg.model)
    save_text_checkpoint(path, experiment=cfg, state=model.state_dict(), step=seed, epoch=0, dataset={})
    return str(path)


def stdlib_prompt(n: int = 64) -> str:
    """The first n bytes of the stdlib corpus (its first module), or "def " on a trimmed installation."""
    import sysconfig

    from aigc_ray.data.text import STDLIB_FILES

    path = Path(sysconfig.get_paths()["stdlib"]) / STDLIB_FILES[0]
    return path.read_bytes()[:n].decode("utf-8", errors="replace") if path.is_file() else "def "


def plain_server(checkpoint: str, port: int, device: str) -> None:
    """The baseline: uvicorn + FastAPI, the model in this process, the envelope of /v1/generate."""
    import base64

    import torch
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    from aigc_ray.images import encode_png
    from aigc_ray.pipeline import GeneratorPipeline
    from aigc_ray.serving.model import png_text

    torch.set_num_threads(1)
    pipe = GeneratorPipeline.from_checkpoint(checkpoint, device)
    app = FastAPI()

    class Body(BaseModel):
        num_images: int = 1
        seed: int = 0

    @app.post("/v1/generate")
    def generate(body: Body):  # a plain def: FastAPI runs it in its thread pool, off the event loop
        seeds = [body.seed + i for i in range(body.num_images)]
        images = pipe.generate(seeds)
        return {"model": "gen", "model_version": pipe.version, "seeds": seeds,
                "images": [base64.b64encode(encode_png(img, png_text(pipe.version, s))).decode()
                           for img, s in zip(images, seeds)]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def http_session(port: int):
    """The HTTP load generator's client: aiohttp, one connection per concurrent request, kept alive.
    Not httpx: at concurrency 64 its pool held 13-15 connections and queued the other requests
    unfairly inside the client, which alone put a 0.8-1.0 s p99 on the plain server (aiohttp, same
    server, same run: 64 connections, p99 0.34-0.38 s, 410 against 290-340 requests/s)."""
    import aiohttp

    return aiohttp.ClientSession(f"http://127.0.0.1:{port}", connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=60))


async def run_plain(args, ckpt: str, results: dict) -> None:
    import subprocess

    import aiohttp

    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--plain-server", ckpt, str(port), "--device", args.device],
                            preexec_fn=lambda: os.nice(args.niceness))  # Ray's workers' niceness: a fair comparison
    try:
        async with http_session(port) as client:
            for _ in range(1200):  # up within 120 s (a niced server starts slowly on a busy machine), or say so
                try:
                    await http_sender(client)(seed=0, n=1)
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                raise RuntimeError("plain server did not start in 120 s")
            await load(http_sender(client), 4, 1.0, args.images_per_request)  # warm-up
            for c in args.concurrency:
                results["p_plain_http"][str(c)] = r = await load(http_sender(client), c, args.duration,
                                                                 args.images_per_request)
                print(f"{'p_plain_http':18s} c={c:<3d} {r['images_per_s']:8.1f} img/s  p50 {r['p50_ms']:8.1f} ms  "
                      f"p99 {r['p99_ms']:8.1f} ms  errors {r['errors']}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def summarize(latencies: list[float], images: int, errors: int, seconds: float) -> dict:
    lat = sorted(latencies) or [float("nan")]
    return {"images_per_s": round(images / seconds, 1), "p50_ms": round(1e3 * lat[len(lat) // 2], 2),
            "p99_ms": round(1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2), "requests": len(latencies),
            "errors": errors}


def bench_inprocess(checkpoint: str, concurrency: int, duration: float, device: str = "cpu") -> dict:
    from aigc_ray.pipeline import GeneratorPipeline

    pipe = GeneratorPipeline.from_checkpoint(checkpoint, device)
    pipe.generate(list(range(concurrency)))  # warm-up
    lat, n, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < duration:
        t = time.perf_counter()
        pipe.generate(list(range(n, n + concurrency)))
        lat.append(time.perf_counter() - t)
        n += concurrency
    # every image of a batch waits for the whole batch: per-request latency = batch latency
    return summarize(lat, n, 0, time.perf_counter() - start)


async def load(send, concurrency: int, duration: float, per_request: int, seen: list | None = None) -> dict:
    lat, errors, stop = [], [0], time.perf_counter() + duration

    async def worker(w: int):
        i = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                version = await send(seed=w * 1_000_000 + i, n=per_request)
                lat.append(time.perf_counter() - t)
                if seen is not None:
                    seen.append((t, version))
            except Exception as err:  # counted, and the first few shown
                errors[0] += 1
                if errors[0] <= 3:
                    print(f"  request failed: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return summarize(lat, len(lat) * per_request, errors[0], time.perf_counter() - start)


def http_sender(client, hops: list | None = None):
    """hops: collects (client ms, {hop: ms}) from the Server-Timing header our ingress sends."""
    async def send(seed: int, n: int) -> str:
        t = time.perf_counter()
        async with client.post("/v1/generate", json={"num_images": n, "seed": seed}) as r:
            body = await r.read()
            r.raise_for_status()
            timing = r.headers.get("server-timing")
        if hops is not None and timing:
            parts = dict(p.strip().split(";dur=") for p in timing.split(","))
            hops.append(((time.perf_counter() - t) * 1e3, {k: float(v) for k, v in parts.items()}))
        return json.loads(body)["model_version"]
    return send


def hop_breakdown(hops: list) -> dict:
    """Mean ms per hop: proxy+transport (client - ingress), ingress own work (ingress - model: routing, the
    handle call, base64/JSON), the model replica's batch wait, forward pass and PNG encoding."""
    if not hops:
        return {}
    n = len(hops)
    mean = {k: sum(h[k] for _, h in hops) / n for k in hops[0][1]}
    client = sum(c for c, _ in hops) / n
    return {"client": round(client, 2), "proxy_and_transport": round(client - mean["ingress"], 2),
            "ingress_and_handle_call": round(mean["ingress"] - mean["model"], 2),
            "model_batch_wait_and_queue": round(mean["batch_wait"], 2), "model_forward": round(mean["forward"], 2),
            "model_png": round(mean["png"], 2)}


def grpc_sender(stub):
    from aigc_ray.serving.proto import aigc_pb2

    async def send(seed: int, n: int) -> str:
        resp = await stub.Generate(aigc_pb2.GenerateRequest(num_images=n, seed=seed), timeout=60)
        return resp.model_version
    return send


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_serve_modes(args, ckpt_a: str, ckpt_b: str, results: dict) -> None:
    import grpc

    from aigc_ray.serving import app
    from aigc_ray.serving.proto import aigc_pb2_grpc

    http_port, grpc_port = free_port(), free_port()
    quiet = {"access_log": False} if args.no_access_log else {}
    app.start(http_port=http_port, grpc_port=grpc_port, request_timeout_s=60, **quiet)
    base = {"max_num_images": 64, "min_replicas": 1, "max_replicas": 1, "replica_cpus": 1, "request_timeout_s": 60,
            "replica_gpus": 1 if args.device == "cuda" else 0, "max_queued_requests": 4096,
            "max_ongoing_requests": 256, **quiet}  # throughput cells measure speed, not shedding
    async with http_session(http_port) as client, \
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = aigc_pb2_grpc.GeneratorStub(channel)
        # unbatched first, so (b), (d) and the swap share one batched deployment and the swap is a pure
        # user_config change; gRPC reuses the HTTP mode's deployment
        for mode, batch, sender in [("c_http_unbatched", 1, http_sender(client)), ("e_grpc_unbatched", 1, grpc_sender(stub)),
                                    ("b_http_batched", 64, http_sender(client)), ("d_grpc_batched", 64, grpc_sender(stub))]:
            if "http" in mode:
                await asyncio.to_thread(app.deploy, {**base, "checkpoints": [f"gen={ckpt_a}"], "max_batch_images": batch})
            await load(sender, 4, 1.0, args.images_per_request)  # warm-up
            for c in args.concurrency:
                hops: list = []
                if "http" in mode:
                    sender = http_sender(client, hops)
                results[mode][str(c)] = r = await load(sender, c, args.duration, args.images_per_request)
                r["hops_ms"] = hop_breakdown(hops)
                print(f"{mode:18s} c={c:<3d} {r['images_per_s']:8.1f} img/s  p50 {r['p50_ms']:8.1f} ms  "
                      f"p99 {r['p99_ms']:8.1f} ms  errors {r['errors']}  hops {r['hops_ms']}", flush=True)

        # swap under load: batched deployment serving A; swap to B mid-run at concurrency 16
        seen: list = []
        task = asyncio.create_task(load(http_sender(client), 16, args.swap_duration, args.images_per_request, seen))
        await asyncio.sleep(args.swap_duration / 3)
        t_swap = time.perf_counter()
        await asyncio.to_thread(app.deploy, {**base, "checkpoints": [f"gen={ckpt_b}"], "max_batch_images": 64})
        swap_s = time.perf_counter() - t_swap
        r = await task
        versions = [v for _, v in sorted(seen)]
        changes = sum(1 for a, b in zip(versions, versions[1:]) if a != b)
        results["swap_under_load"] = {**r, "versions_in_order": list(dict.fromkeys(versions)), "version_changes": changes,
                                      "swap_call_s": round(swap_s, 2),
                                      "ok": r["errors"] == 0 and len(set(versions)) == 2 and versions[-1] != versions[0]}
        print(f"swap under load (c=16): errors {r['errors']}, versions {results['swap_under_load']['versions_in_order']}, "
              f"flips {changes}, redeploy call {swap_s:.1f}s -> {'OK' if results['swap_under_load']['ok'] else 'FAILED'}")
        if args.overload:
            await run_overload(args, app, ckpt_b, http_port, stub, results)


async def open_loop(send, rate: float, duration: float, timeout_s: float) -> dict:
    """Requests at a fixed arrival rate whatever the answers (a closed loop would slow down with the server):
    the rate this client actually kept (it shares the machine's CPUs with the server), latency of the admitted
    (200 / OK), of the shed (503 / RESOURCE_EXHAUSTED), and how many hung (no answer within timeout_s) or failed
    otherwise."""
    admitted, shed, other = [], [], [0, 0]

    async def one():
        t = time.perf_counter()
        try:
            code = await asyncio.wait_for(send(), timeout_s)
        except asyncio.TimeoutError:
            other[0] += 1
            return
        if code in ("ok", "shed"):
            (admitted if code == "ok" else shed).append(time.perf_counter() - t)
        else:
            other[1] += 1

    tasks, start = [], time.perf_counter()
    for i in range(int(rate * duration)):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one()))
    sending_s = time.perf_counter() - start  # longer than `duration` when this client cannot keep the rate
    await asyncio.gather(*tasks)
    pct = lambda xs, q: round(1e3 * sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None  # noqa: E731
    return {"rate": round(rate, 1), "achieved_rate": round(len(tasks) / max(sending_s, 1e-9), 1),
            "sent": len(tasks), "admitted": len(admitted), "shed": len(shed), "hung": other[0],
            "failed": other[1], "admitted_p50_ms": pct(admitted, 0.5), "admitted_p99_ms": pct(admitted, 0.99),
            "shed_p99_ms": pct(shed, 0.99)}


async def run_overload(args, app, ckpt: str, http_port: int, stub, results: dict) -> None:
    """The shipped bounds (ServeOptions' max_ongoing_requests / max_queued_requests), one replica, batching on:
    open-loop load at 0.5x the sustainable rate (uncongested), then at 4x. Target: admitted p99 at 4x <= 2x the
    uncongested p99; the rest shed fast; nothing hangs. HTTP goes through aiohttp (http_session), as in the
    closed-loop cells: httpx could not send more than ~120 requests/s here, so "4x" was never sent."""
    import grpc

    from aigc_ray.serving.proto import aigc_pb2

    session = http_session(http_port)

    async def http_send():
        async with session.post("/v1/generate", json={"num_images": args.images_per_request}) as r:
            await r.read()
            return "ok" if r.status == 200 else "shed" if r.status == 503 else str(r.status)

    async def grpc_send():
        try:
            await stub.Generate(aigc_pb2.GenerateRequest(num_images=args.images_per_request), timeout=60)
            return "ok"
        except grpc.aio.AioRpcError as err:
            return "shed" if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else err.code().name

    await asyncio.to_thread(app.deploy, {"checkpoints": [f"gen={ckpt}"], "min_replicas": 1, "max_replicas": 1,
                                         **({"access_log": False} if args.no_access_log else {}),
                                         "replica_cpus": 1, "replica_gpus": 1 if args.device == "cuda" else 0})
    out = results["overload"] = {}
    for proto, send, closed in (("http", http_send, "b_http_batched"), ("grpc", grpc_send, "d_grpc_batched")):
        cells = results[closed]
        sustainable = max(cells[c]["images_per_s"] for c in cells) / args.images_per_request
        calm = await open_loop(send, 0.5 * sustainable, args.duration, 30)
        hot = await open_loop(send, 4 * sustainable, args.duration, 30)
        ratio = hot["admitted_p99_ms"] / calm["admitted_p99_ms"] if hot["admitted_p99_ms"] and calm["admitted_p99_ms"] else None
        kept = hot["achieved_rate"] / sustainable  # the multiple of the sustainable rate this client really sent
        out[proto] = {"sustainable_rps": round(sustainable, 1), "at_0.5x": calm, "at_4x": hot,
                      "admitted_p99_ratio": round(ratio, 2) if ratio else None, "overload_kept": round(kept, 2),
                      "ok": bool(ratio and ratio <= 2 and hot["hung"] == 0 and hot["failed"] == 0 and kept >= 3.6)}
        print(f"overload {proto}: 0.5x {calm}\n           4x   {hot}\n           admitted p99 4x / 0.5x = "
              f"{out[proto]['admitted_p99_ratio']} (target <= 2) -> {'OK' if out[proto]['ok'] else 'MISSED'}"
              + (f"; this client kept only {kept:.1f}x the sustainable rate" if kept < 3.6 else ""), flush=True)
    await session.close()


# ---- text completion (--text) ------------------------------------------------------------------------

def summarize_text(records: list[dict], errors: int, seconds: float) -> dict:
    """records: {"tokens", "total_s", "ttft_s" (None without streaming)} per finished request."""
    def pct(xs: list[float], q: float) -> float | None:
        xs = sorted(xs)
        return round(1e3 * xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None

    tokens = sum(r["tokens"] for r in records)
    out = {"tokens_per_s": round(tokens / seconds, 1), "requests": len(records), "tokens": tokens, "errors": errors,
           "latency_p50_ms": pct([r["total_s"] for r in records], 0.5),
           "latency_p99_ms": pct([r["total_s"] for r in records], 0.99), "ttft_p50_ms": None, "ttft_p99_ms": None}
    streamed = [r for r in records if r.get("ttft_s") is not None]
    if streamed:
        rates = sorted((r["tokens"] - 1) / max(r["total_s"] - r["ttft_s"], 1e-9) for r in streamed if r["tokens"] > 1)
        out |= {"ttft_p50_ms": pct([r["ttft_s"] for r in streamed], 0.5),
                "ttft_p99_ms": pct([r["ttft_s"] for r in streamed], 0.99),
                "stream_tokens_per_s_p50": round(rates[len(rates) // 2], 1) if rates else None}
    if records and "first_piece_tokens" in records[0]:  # (a): tokens already sampled when the first piece came out
        out["first_piece_tokens_mean"] = round(sum(r["first_piece_tokens"] for r in records) / len(records), 2)
    return out


def print_text(mode: str, c: int, r: dict) -> None:
    ttft = "" if r["ttft_p50_ms"] is None else f"  TTFT p50 {r['ttft_p50_ms']:7.1f} ms p99 {r['ttft_p99_ms']:7.1f} ms"
    print(f"{mode:18s} c={c:<3d} {r['tokens_per_s']:8.1f} tok/s{ttft}  latency p50 {r['latency_p50_ms']:8.1f} ms  "
          f"p99 {r['latency_p99_ms']:8.1f} ms  requests {r['requests']}  errors {r['errors']}", flush=True)


def bench_text_plain(pipe, prompt: str, settings: dict, concurrency: int, duration: float) -> dict:
    """(a) The plain PyTorch loop: TextPipeline.stream in this process, `concurrency` threads, each one request
    at a time (the replica also computes each token in a worker thread, so streams interleave the same way)."""
    from aigc_ray.text_pipeline import SamplingSettings

    records: list[dict] = []
    stop = time.perf_counter() + duration

    def slot(w: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            progress: dict = {}
            first, first_tokens, t = None, 0, time.perf_counter()
            for _ in pipe.stream(prompt, SamplingSettings(**settings, seed=w * 1_000_000 + i), progress):
                if first is None:
                    first, first_tokens = time.perf_counter(), progress["tokens"]
            records.append({"tokens": progress["tokens"], "total_s": time.perf_counter() - t,
                            "ttft_s": None if first is None else first - t, "first_piece_tokens": first_tokens})
            i += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=slot, args=(w,)) for w in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return summarize_text(records, 0, time.perf_counter() - start)


async def text_load(send, concurrency: int, duration: float) -> dict:
    """Closed loop of `concurrency` asyncio clients; send(seed) -> a record for summarize_text."""
    records, errors, stop = [], [0], time.perf_counter() + duration

    async def worker(w: int):
        i = 0
        while time.perf_counter() < stop:
            try:
                records.append(await send(seed=w * 1_000_000 + i))
            except Exception as err:  # counted, and the first few shown
                errors[0] += 1
                if errors[0] <= 3:
                    print(f"  request failed: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return summarize_text(records, errors[0], time.perf_counter() - start)


def sse_sender(client, body: dict):
    """(b) POST /v1/complete with stream: the time to the first `data` event (a piece of text; the `start`
    event before it carries no token), the token count of the `done` event."""
    async def send(seed: int) -> dict:
        t, first, tokens, event = time.perf_counter(), None, None, "message"
        async with client.post("/v1/complete", json={**body, "seed": seed, "stream": True}) as r:
            r.raise_for_status()
            async for raw in r.content:
                line = raw.decode("utf-8").rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    if event == "message" and first is None:
                        first = time.perf_counter()
                    elif event == "done":
                        tokens = json.loads(line[6:])["tokens"]
                    elif event == "error":
                        raise RuntimeError(json.loads(line[6:])["error"])
                    event = "message"
        if tokens is None:
            raise RuntimeError("the stream ended without a done event")
        return {"tokens": tokens, "total_s": time.perf_counter() - t, "ttft_s": None if first is None else first - t}
    return send


def complete_sender(client, body: dict):
    """(c) POST /v1/complete, one JSON answer."""
    async def send(seed: int) -> dict:
        t = time.perf_counter()
        async with client.post("/v1/complete", json={**body, "seed": seed}) as r:
            data = await r.read()
            r.raise_for_status()
        return {"tokens": json.loads(data)["tokens"], "total_s": time.perf_counter() - t, "ttft_s": None}
    return send


def grpc_complete_sender(stub, body: dict):
    """(d) aigc.v1.Generator/Complete: the time to the first chunk with text (the first chunk carries only the
    model version and seed), the token count of the done chunk."""
    from aigc_ray.serving.proto import aigc_pb2

    async def send(seed: int) -> dict:
        t, first, tokens = time.perf_counter(), None, None
        request = aigc_pb2.CompleteRequest(prompt=body["prompt"], max_new_tokens=body["max_new_tokens"],
                                           temperature=body["temperature"], seed=seed)
        async for chunk in stub.Complete(request, timeout=60):
            if chunk.done:
                tokens = chunk.tokens
            elif chunk.text and first is None:
                first = time.perf_counter()
        if tokens is None:
            raise RuntimeError("the stream ended without a done chunk")
        return {"tokens": tokens, "total_s": time.perf_counter() - t, "ttft_s": None if first is None else first - t}
    return send


TEXT_SERVE_MODES = ("b_http_stream", "c_http", "d_grpc_stream")


async def run_text_serve_modes(args, ckpt: str, body: dict, results: dict) -> None:
    import grpc

    from aigc_ray.serving import app
    from aigc_ray.serving.proto import aigc_pb2_grpc

    http_port, grpc_port = free_port(), free_port()
    quiet = {"access_log": False} if args.no_access_log else {}
    app.start(http_port=http_port, grpc_port=grpc_port, request_timeout_s=60, **quiet)
    # alone, so the text model runs in the ingress replica; one replica; bounds wide (speed, not shedding)
    await asyncio.to_thread(app.deploy, {"checkpoints": [f"text={ckpt}"], "min_replicas": 1, "max_replicas": 1,
                                         "replica_cpus": 1, "replica_gpus": 1 if args.device == "cuda" else 0,
                                         "request_timeout_s": 60, "max_queued_requests": 4096,
                                         "max_ongoing_requests": 256,
                                         "max_new_tokens": max(1024, args.max_new_tokens), **quiet})
    async with http_session(http_port) as client, \
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = aigc_pb2_grpc.GeneratorStub(channel)
        senders = {"b_http_stream": sse_sender(client, body), "c_http": complete_sender(client, body),
                   "d_grpc_stream": grpc_complete_sender(stub, body)}
        for mode in TEXT_SERVE_MODES:
            for seed in range(2):  # warm-up
                await senders[mode](seed=seed)
            for c in args.concurrency:
                results[mode][str(c)] = r = await text_load(senders[mode], c, args.duration)
                print_text(mode, c, r)


def text_main(args) -> int:
    """--text: (a) the plain PyTorch loop, then (b)-(d) through Serve; Serve / plain at every concurrency."""
    import torch

    from aigc_ray.text_pipeline import TextPipeline

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-text-"))
    ckpt = args.checkpoint or make_text_checkpoint(tmp / "checkpoint_text", args.text_config, 1)
    prompt = stdlib_prompt() if args.prompt is None else args.prompt
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    results: dict = {"config": {**vars(args), "prompt": prompt, "checkpoint": ckpt,
                                "machine": f"{os.cpu_count()}-core CPU (shared with other jobs)",
                                "command": shlex.join(["python", *sys.argv]),
                                "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
                     "a_plain_torch": {}, **{m: {} for m in TEXT_SERVE_MODES}}
    torch.set_num_threads(1)  # like one Serve replica with num_cpus=1
    pipe = TextPipeline.from_checkpoint(ckpt, args.device)
    results["config"]["model_version"] = pipe.version
    print(f"{args.text_config}: {pipe.version}, prompt {prompt!r} ({len(prompt.encode())} bytes), "
          f"{args.max_new_tokens} new tokens, temperature {args.temperature}", flush=True)
    bench_text_plain(pipe, prompt, settings, 1, 0.0)  # warm-up: one request
    for c in args.concurrency:
        results["a_plain_torch"][str(c)] = r = bench_text_plain(pipe, prompt, settings, c, args.duration)
        print_text("a_plain_torch", c, r)
    del pipe

    from ray import serve

    start_ray(args)
    try:
        asyncio.run(run_text_serve_modes(args, ckpt, {"prompt": prompt, **settings}, results))
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()

    def ratio(x: float | None, y: float | None) -> float | None:
        return None if x is None or not y else round(x / y, 2)

    results["config"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    plain = results["a_plain_torch"]
    results["serve_vs_plain"] = {c: {mode: {"tokens_per_s_ratio": ratio(results[mode][c]["tokens_per_s"],
                                                                        plain[c]["tokens_per_s"]),
                                            "ttft_p50_ratio": ratio(results[mode][c]["ttft_p50_ms"], plain[c]["ttft_p50_ms"]),
                                            "latency_p50_ratio": ratio(results[mode][c]["latency_p50_ms"],
                                                                       plain[c]["latency_p50_ms"])}
                                     for mode in TEXT_SERVE_MODES}
                                 for c in plain}
    print("Serve / plain PyTorch loop, tokens/s ratio (TTFT p50 ratio):")
    for c, modes in results["serve_vs_plain"].items():
        print(f"  c={c:<3s} " + "  ".join(f"{m}: {v['tokens_per_s_ratio']}x"
                                          + ("" if v["ttft_p50_ratio"] is None else f" ({v['ttft_p50_ratio']}x)")
                                          for m, v in modes.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(args.out)
    return 0 if all(results[m][c]["errors"] == 0 for m in TEXT_SERVE_MODES for c in plain) else 1


def start_ray(args) -> None:
    """The local Ray of the Serve modes: the --serve-env variables, the --ingress, Ray's workers at --niceness."""
    import ray

    os.environ.update(dict(kv.split("=", 1) for kv in args.serve_env))
    if args.ingress == "haproxy":
        from aigc_ray.serving.app import use_haproxy_ingress

        use_haproxy_ingress()
    os.environ["RAY_worker_niceness"] = str(args.niceness)  # each worker nice()s itself by this (core_worker.cc)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)


def main() -> int:
    from aigc_ray.serving.options import INGRESSES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per (mode, concurrency) cell")
    p.add_argument("--swap-duration", type=float, default=15.0)
    p.add_argument("--concurrency", type=int, nargs="+", help="clients in each cell (default 1 8 64; --text: 1 8)")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--checkpoint", help="checkpoint A (default: a fresh dcgan-digits init; --text: a fresh init of "
                                        "--text-config)")
    p.add_argument("--checkpoint-b", help="checkpoint swapped to under load (default: another fresh init)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs for the local Ray")
    p.add_argument("--image-size", type=int, default=16, help="side of the default fresh checkpoints (16: dcgan-digits; "
                                                              "64 makes the model's own work count)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="channels of the default fresh checkpoints")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs, in every mode")
    p.add_argument("--niceness", type=int, default=0,
                   help="niceness of Ray's worker processes (Serve's proxy and replicas; Ray's own default is 15, "
                        "`aigc-ray serve` uses 0) and of the plain server alike; the load generator keeps this "
                        "process's")
    p.add_argument("--overload", action="store_true", help="then open-loop load at 0.5x and 4x the sustainable "
                   "rate with the shipped queue bounds (admitted p99, shed latency, hangs)")
    p.add_argument("--no-access-log", action="store_true", help="Serve without its access log line per request "
                   "(the plain server writes none)")
    p.add_argument("--ingress", choices=INGRESSES, default="proxy",
                   help="what takes Serve's requests in, as `aigc-ray serve --ingress`: Ray's proxy actors, or HAProxy "
                        "sending each request straight to a replica")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for Ray's processes (proxy, replicas), e.g. RAY_SERVE_... knobs")
    p.add_argument("--text", action="store_true", help="text completion instead of images: the plain PyTorch loop "
                   "against Serve's streaming HTTP, plain HTTP and streaming gRPC (tokens/s, time to first token)")
    p.add_argument("--text-config", choices=TEXT_CONFIGS, default="gpt-stdlib",
                   help="--text: the shipped config of the fresh text checkpoint (default gpt-stdlib)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="--text: bytes generated per request (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="--text: sampling temperature (default 0.8)")
    p.add_argument("--prompt", help="--text: the prompt of every request (default: the first 64 bytes of the stdlib "
                                    "corpus)")
    p.add_argument("--plain-server", nargs=2, metavar=("CHECKPOINT", "PORT"), help=argparse.SUPPRESS)
    p.add_argument("--out", help="results file (default bench/results/serve_load.json; --text: "
                                 "bench/results/serve_load_text.json)")
    args = p.parse_args()
    args.concurrency = args.concurrency or ([1, 8] if args.text else [1, 8, 64])
    args.out = args.out or str(Path(__file__).parent / "results" / ("serve_load_text.json" if args.text
                                                                      else "serve_load.json"))
    if args.plain_server:
        plain_server(args.plain_server[0], int(args.plain_server[1]), args.device)
        return 0
    if args.text:
        return text_main(args)

    import ray
    from ray import serve

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    ckpt_a = args.checkpoint or make_checkpoint(tmp / "a" / "checkpoint_a", 1, args.image_size, args.channels)
    ckpt_b = args.checkpoint_b or make_checkpoint(tmp / "b" / "checkpoint_b", 2, args.image_size, args.channels)
    results: dict = {"config": {**vars(args), "machine": f"{os.cpu_count()}-core CPU (shared with other jobs)"},
                     "a_inprocess": {}, "b_http_batched": {}, "c_http_unbatched": {}, "d_grpc_batched": {},
                     "e_grpc_unbatched": {}, "p_plain_http": {}}
    import torch

    torch.set_num_threads(1)  # like one Serve replica with num_cpus=1
    for c in args.concurrency:
        results["a_inprocess"][str(c)] = r = bench_inprocess(ckpt_a, c, args.duration, args.device)
        print(f"{'a_inprocess':18s} c={c:<3d} {r['images_per_s']:8.1f} img/s  p50 {r['p50_ms']:8.1f} ms  "
              f"p99 {r['p99_ms']:8.1f} ms", flush=True)
    asyncio.run(run_plain(args, ckpt_a, results))
    start_ray(args)
    try:
        asyncio.run(run_serve_modes(args, ckpt_a, ckpt_b, results))
    finally:
        serve.shutdown()
        ray.shutdown()
    top = str(max(args.concurrency))

    def ratio(x: str, y: str) -> float:
        return round(results[x][top]["images_per_s"] / max(results[y][top]["images_per_s"], 1e-9), 2)

    results["ratios_at_max_concurrency"] = {"b_over_c_batching_gain": ratio("b_http_batched", "c_http_unbatched"),
                                            "b_over_a_serve_vs_ceiling": ratio("b_http_batched", "a_inprocess"),
                                            "d_over_b_grpc_vs_http": ratio("d_grpc_batched", "b_http_batched"),
                                            "e_over_c_grpc_vs_http_unbatched": ratio("e_grpc_unbatched", "c_http_unbatched")}
    print("ratios at c=" + top + ":", json.dumps(results["ratios_at_max_concurrency"]))
    plain = results["p_plain_http"]
    results["serve_vs_plain"] = {c: {mode: {"rps_ratio": round(results[mode][c]["images_per_s"] /
                                                              max(plain[c]["images_per_s"], 1e-9), 2),
                                            "p50_ratio": round(results[mode][c]["p50_ms"] / max(plain[c]["p50_ms"], 1e-9), 2)}
                                     for mode in ("b_http_batched", "c_http_unbatched", "d_grpc_batched", "e_grpc_unbatched")}
                                 for c in plain}
    print("Serve / plain server, requests/s ratio (p50 ratio):")
    for c, modes in results["serve_vs_plain"].items():
        print(f"  c={c:<3s} " + "  ".join(f"{m}: {v['rps_ratio']:.2f}x ({v['p50_ratio']:.2f}x)" for m, v in modes.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(args.out)
    return 0 if results["swap_under_load"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
