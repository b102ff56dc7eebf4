"""Overload against the queue bound: where does an admitted request wait at 4x the sustainable rate?

    python bench/serve_overload_bounds.py [ONGOING,QUEUED ...]   (default: 32,64 8,1 4,1 2,1 1,1)

One replica, batching on, no access log, Ray's workers at niceness 0, HAProxy in front (--ingress proxy for
Ray's proxy). The sustainable rate is the best closed-loop rate at concurrency 8 and 64 (bench/serve_load.py's
load), then for each bound (max_ongoing_requests, max_queued_requests): open-loop load (serve_load.open_loop,
aiohttp) at 0.5x for --duration seconds, then at 4x. Prints one JSON line per bound: admitted p50/p99, shed
p99, hung, and admitted p99 at 4x / 0.5x (the issue's target: <= 2). If the wait were in the bounded queue, a
smaller bound would shorten it; if it stays, the wait is in front of the bound. Writes
bench/results/serve_overload_bounds.json. Load generator on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import serve_load as sl  # noqa: E402 (bench/, beside this script)


async def measure(bounds: list[tuple[int, int]], duration: float) -> dict:
    from aigc_ray.serving import app

    ckpt = sl.make_checkpoint(Path(tempfile.mkdtemp()) / "a", 0)
    http_port, grpc_port = sl.free_port(), sl.free_port()
    app.start(http_port=http_port, grpc_port=grpc_port, request_timeout_s=60, access_log=False)
    base = {"checkpoints": [f"gen={ckpt}"], "max_num_images": 64, "min_replicas": 1, "max_replicas": 1,
            "replica_cpus": 1, "replica_gpus": 0, "access_log": False, "max_batch_images": 64}
    await asyncio.to_thread(app.deploy, {**base, "max_queued_requests": 4096, "max_ongoing_requests": 256})
    async with sl.http_session(http_port) as client:
        await sl.load(sl.http_sender(client), 4, 1.0, 1)  # warm-up
        sustainable = max([(await sl.load(sl.http_sender(client), c, 4, 1))["images_per_s"] for c in (8, 64)])
    print(f"sustainable {sustainable:.1f} requests/s", flush=True)
    out: dict = {"sustainable_rps": sustainable, "runs": []}
    for ongoing, queued in bounds:
        await asyncio.to_thread(app.deploy, {**base, "max_ongoing_requests": ongoing, "max_queued_requests": queued})
        async with sl.http_session(http_port) as session:
            async def send():
                async with session.post("/v1/generate", json={"num_images": 1}) as r:
                    await r.read()
                    return "ok" if r.status == 200 else "shed" if r.status == 503 else str(r.status)

            await sl.open_loop(send, 0.3 * sustainable, 1.5, 30)  # warm-up at the new bound
            calm = await sl.open_loop(send, 0.5 * sustainable, duration, 30)
            hot = await sl.open_loop(send, 4 * sustainable, duration, 30)
        ratio = hot["admitted_p99_ms"] / calm["admitted_p99_ms"] if hot["admitted_p99_ms"] and calm["admitted_p99_ms"] else None
        row = {"ongoing": ongoing, "queued": queued, "calm": calm, "hot": hot, "ratio": ratio and round(ratio, 1)}
        print(json.dumps(row), flush=True)
        out["runs"].append(row)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bounds", nargs="*", default=["32,64", "8,1", "4,1", "2,1", "1,1"],
                   help="ONGOING,QUEUED pairs (both >= 1)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds at each rate")
    from aigc_ray.serving.options import INGRESSES

    p.add_argument("--ingress", choices=INGRESSES, default="haproxy")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_overload_bounds.json"))
    args = p.parse_args()
    bounds = [tuple(int(x) for x in b.split(",")) for b in args.bounds]
    if any(len(b) != 2 or min(b) < 1 for b in bounds):
        p.error(f"bounds are ONGOING,QUEUED pairs of integers >= 1, got {args.bounds}")

    import ray

    if args.ingress == "haproxy":
        from aigc_ray.serving.app import use_haproxy_ingress

        use_haproxy_ingress()
    os.environ["RAY_worker_niceness"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = asyncio.run(measure(bounds, args.duration))
    finally:
        ray.shutdown()
    Path(args.out).write_text(json.dumps({"ingress": args.ingress, **out}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
