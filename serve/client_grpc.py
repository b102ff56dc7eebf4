"""Minimal gRPC client: health check, then generate images and write them as PNG files, or (text mode,
--prompt) continue a prompt with a text model and print the server stream as it arrives.

    python serve/client_grpc.py --target 127.0.0.1:9000 --num-images 4 --seed 42 --out-dir out/
    python serve/client_grpc.py --prompt "def main():" --max-new-tokens 200 --seed 1
"""

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aigc_ray.serving.proto import aigc_pb2, aigc_pb2_grpc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="127.0.0.1:9000", help="the server's gRPC address (default 127.0.0.1:9000)")
    p.add_argument("--model", default="", help="served model name; default: the first")
    p.add_argument("--num-images", type=int, default=4, help="images to generate (default 4)")
    p.add_argument("--seed", type=int, help="image i uses seed + i (default: the server picks one)")
    p.add_argument("--labels", help="comma-separated labels for a class-conditional model")
    p.add_argument("--out-dir", default="generated", help="where the PNG files go (default: generated)")
    p.add_argument("--token", default=os.environ.get("AIGC_API_TOKEN"),
                   help="bearer token the server asks for (default: the AIGC_API_TOKEN environment variable)")
    p.add_argument("--prompt", help="text mode: the prompt a text model continues (streamed to stdout)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="text mode: bytes to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="text mode: 0 = greedy")
    args = p.parse_args()
    with grpc.insecure_channel(args.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        print("health:", health_pb2.HealthCheckResponse.ServingStatus.Name(status), file=sys.stderr)
        if args.prompt is not None:
            return complete(channel, args)
        request = aigc_pb2.GenerateRequest(model=args.model, num_images=args.num_images,
                                           labels=[int(v) for v in args.labels.split(",")] if args.labels else [])
        if args.seed is not None:
            request.seed = args.seed
        try:
            metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
            resp = aigc_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=60, metadata=metadata)
        except grpc.RpcError as err:
            print(f"{err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for seed, image in zip(resp.seeds, resp.images):
        path = out / f"{resp.model_version}_seed{seed}.png"
        path.write_bytes(image)
        print(path)
    return 0


def complete(channel, args) -> int:
    """aigc.v1.Generator/Complete (server streaming): print each piece as its chunk arrives."""
    request = aigc_pb2.CompleteRequest(model=args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature)
    if args.seed is not None:
        request.seed = args.seed
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    try:
        for chunk in aigc_pb2_grpc.GeneratorStub(channel).Complete(request, timeout=60, metadata=metadata):
            if chunk.done:
                print(f"\n[{chunk.model_version} seed {chunk.seed}: {chunk.tokens} tokens, {chunk.finish_reason}; "
                      f"AI-generated: {chunk.ai_generated}]", file=sys.stderr)
            else:
                print(chunk.text, end="", flush=True)
    except grpc.RpcError as err:
        print(f"{err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
