"""The Serve application: a thin FastAPI + gRPC ingress in front of one model deployment per checkpoint.

    build_app({"checkpoints": [...], ...})   -> Application (also the `serve deploy` import path)
    run(options, host, http_port, grpc_port) -> start Serve and deploy it (used by `aigc-ray serve`)

HTTP: POST /v1/generate, /v1/interpolate, /v1/reconstruct, GET /v1/models, /healthz (OpenAPI at /docs).
gRPC: aigc.v1.Generator (serve/aigc.proto) and grpc.health.v1.Health/Check, through Serve's gRPC proxy,
which routes every method to the ingress deployment's method of the same name.
"""

# No `from __future__ import annotations`: Serve re-binds the FastAPI routes of the class and string
# annotations of request bodies then fail to resolve (pydantic "not fully defined").
import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import secrets
from pathlib import PurePosixPath
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from aigc_ray.serving.model import BadRequest, GeneratorModel

GRPC_SERVICERS = ["aigc_ray.serving.proto.aigc_pb2_grpc.add_GeneratorServicer_to_server",
                  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
APP_NAME = "aigc"
HARD_MAX_IMAGES = 4096  # schema-level cap; the configured max_num_images is checked on top


@dataclasses.dataclass
class ServeOptions:
    checkpoints: list = dataclasses.field(default_factory=list)
    """Checkpoints to serve: "PATH_OR_URI", "NAME=PATH_OR_URI" or {"name", "checkpoint"}. The first is the
    default model; a name defaults to the run directory's name (the checkpoint's parent)."""
    max_num_images: int = 64
    """Most images one request may ask for (generate num_images, interpolate steps, reconstruct images)."""
    max_batch_images: int = 64
    """Most images in one forward pass; @serve.batch packs requests up to this many images (1 = no batching)."""
    batch_wait_timeout_s: float = 0.005
    """How long a batch waits for more requests after its first one."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest HTTP request body accepted (413 above it)."""
    request_timeout_s: float = 30.0
    """A request not answered in this time gets 504 / DEADLINE_EXCEEDED instead of hanging."""
    min_replicas: int = 1
    """Autoscaling floor per model deployment."""
    max_replicas: int = 2
    """Autoscaling ceiling per model deployment."""
    target_ongoing_requests: float = 8.0
    """Autoscaling target of in-flight requests per model replica."""
    replica_cpus: float = 1.0
    """CPUs reserved per model replica (its torch thread budget)."""
    replica_gpus: float = 0.0
    """GPUs per model replica; > 0 runs the model on the replica's GPU (on a cluster, the autoscaler
    adds a GPU node for it). The same seed gives the same bytes on the same kind of device."""

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("checkpoints: give at least one checkpoint path or URI")
        for key in ("max_num_images", "max_batch_images", "max_body_bytes", "min_replicas", "max_replicas"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < (0 if key == "min_replicas" else 1):
                raise ValueError(f"{key}: must be a positive integer, got {getattr(self, key)!r}")
        if self.max_num_images > HARD_MAX_IMAGES:
            raise ValueError(f"max_num_images: at most {HARD_MAX_IMAGES}")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.replica_gpus < 0:
            raise ValueError(f"replica_gpus: must be >= 0, got {self.replica_gpus!r}")
        for key in ("batch_wait_timeout_s", "request_timeout_s", "target_ongoing_requests", "replica_cpus"):
            if getattr(self, key) < 0 or (key != "batch_wait_timeout_s" and getattr(self, key) == 0):
                raise ValueError(f"{key}: must be > 0")

    def models(self) -> dict[str, str]:
        """{name: checkpoint URI}, names unique, in the given order."""
        out: dict[str, str] = {}
        for i, item in enumerate(self.checkpoints):
            if isinstance(item, dict):
                name, uri = item.get("name") or "", item.get("checkpoint") or ""
            else:
                name, sep, uri = str(item).partition("=")
                if not sep or "/" in name or ":" in name:
                    name, uri = "", str(item)
            if not uri:
                raise ValueError(f"checkpoints[{i}]: empty checkpoint path")
            name = name or PurePosixPath(uri.rstrip("/")).parent.name or f"model{i}"
            if name in out:
                name = f"{name}-{i}"
            out[name] = uri
        return out


# ---- request bodies (pydantic: a wrong type or missing field -> 422 naming it) ----------------------

class GenerateBody(BaseModel):
    model: str | None = Field(None, description="served model name (GET /v1/models); default: the first")
    num_images: int = Field(1, ge=1, le=HARD_MAX_IMAGES, description="1..max_num_images")
    seed: int | None = Field(None, ge=0, lt=2**62, description="image i uses seed + i; absent = random")
    labels: list[int] | None = Field(None, max_length=HARD_MAX_IMAGES,
                                     description="class-conditional models: one label for all, or one per image")
    format: Literal["png", "npy"] = Field("png", description="png: base64 PNG per image; npy: one uint8 NCHW array")
    grid: bool = Field(False, description="answer with one PNG grid (image/png) instead of JSON")


class InterpolateBody(BaseModel):
    model: str | None = None
    seed_a: int = Field(..., ge=0, lt=2**62)
    seed_b: int = Field(..., ge=0, lt=2**62)
    steps: int = Field(8, ge=2, le=HARD_MAX_IMAGES)
    label: int | None = Field(None, description="class-conditional models only")


class ReconstructBody(BaseModel):
    model: str | None = None
    images: list[str] = Field(..., min_length=1, max_length=HARD_MAX_IMAGES,
                              description="base64 PNG images of the model's size and channels")


class ImagesOut(BaseModel):
    model: str
    model_version: str
    seeds: list[int]
    images: list[str] = Field(default_factory=list, description="base64 PNG, tEXt: Model-Version, Seed, AI-Generated")
    npy: str | None = Field(None, description="format=npy: base64 of a .npy uint8 (N, C, H, W) array")


def _field_errors(errors: list[dict]) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors)


app = FastAPI(title="aigc-ray", version="1",
              description="Generate, interpolate and reconstruct images with GANs and VAEs trained by aigc-ray. "
                          "Every PNG carries tEXt metadata marking it AI-generated.")
# The limit reaches the middleware through the ingress replica's environment (set in build_app): the
# FastAPI app is pickled into the replica, so a module global changed in __init__ would not be seen.
BODY_LIMIT_ENV = "AIGC_MAX_BODY_BYTES"


@app.middleware("http")
async def _limit_body(request: Request, call_next):
    limit = int(os.environ.get(BODY_LIMIT_ENV, ServeOptions.max_body_bytes))
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return JSONResponse({"error": f"body: larger than the {limit}-byte limit"}, status_code=413)
    if length is None and request.method == "POST":  # chunked: count what arrives
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return JSONResponse({"error": f"body: larger than the {limit}-byte limit"}, status_code=413)
        request._body = body
    return await call_next(request)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError):
    return JSONResponse({"error": _field_errors(exc.errors()), "detail": json.loads(json.dumps(exc.errors(), default=str))},
                        status_code=422)


class UnknownModel(BadRequest):
    pass


def _cause(err: BaseException) -> str:
    """The user-facing message of an exception raised in a model replica (not Ray's traceback)."""
    return str(getattr(err, "cause", None) or err)


def _grid(result: dict) -> bytes:
    import torch
    from torchvision.io import decode_png

    from aigc_ray.pipeline import grid_png
    from aigc_ray.serving.model import png_text

    images = torch.stack([decode_png(torch.frombuffer(bytearray(p), dtype=torch.uint8)) for p in result["images"]])
    text = png_text(result["model_version"], result["seeds"][0])
    return grid_png(images, nrow=max(1, round(len(images) ** 0.5)), text=text)


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})  # thin async proxy: no CPU reserved
@serve.ingress(app)
class Ingress:
    def __init__(self, models: dict[str, DeploymentHandle], options: dict):
        self.models, self.options = models, ServeOptions(**options)
        self.default = next(iter(models))

    # ---- shared core (HTTP and gRPC) -------------------------------------------------------

    def _handle(self, name: str | None) -> tuple[str, DeploymentHandle]:
        name = name or self.default
        if name not in self.models:
            raise UnknownModel(f"model: unknown model {name!r}; served: {', '.join(self.models)}")
        return name, self.models[name]

    def _check_count(self, field: str, n: int) -> None:
        if n > self.options.max_num_images:
            raise BadRequest(f"{field}: {n} exceeds the limit of {self.options.max_num_images} images per request")

    async def _call(self, handle: DeploymentHandle, method: str, *args) -> dict:
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), self.options.request_timeout_s)
        except BadRequest as err:
            raise BadRequest(_cause(err)) from None

    async def _generate(self, body: GenerateBody) -> dict:
        name, handle = self._handle(body.model)
        self._check_count("num_images", body.num_images)
        if body.labels is not None and len(body.labels) not in (1, body.num_images):
            raise BadRequest(f"labels: give 1 label or num_images ({body.num_images}), got {len(body.labels)}")
        seed = secrets.randbelow(2**31) if body.seed is None else body.seed
        seeds = [seed + i for i in range(body.num_images)]
        return await self._call(handle, "generate_array" if body.format == "npy" else "generate", seeds, body.labels)

    async def _interpolate(self, body: InterpolateBody) -> dict:
        name, handle = self._handle(body.model)
        self._check_count("steps", body.steps)
        return await self._call(handle, "interpolate", body.seed_a, body.seed_b, body.steps, body.label)

    async def _reconstruct(self, body_model: str | None, pngs: list[bytes]) -> dict:
        name, handle = self._handle(body_model)
        self._check_count("images", len(pngs))
        return await self._call(handle, "reconstruct", pngs)

    async def _infos(self) -> list[dict]:
        return list(await asyncio.gather(*(h.info.remote() for h in self.models.values())))

    # ---- HTTP ------------------------------------------------------------------------------------

    @staticmethod
    async def _http(coro) -> Any:
        try:
            return await coro
        except UnknownModel as err:
            return JSONResponse({"error": str(err)}, status_code=404)
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=422)
        except asyncio.TimeoutError:
            return JSONResponse({"error": "timeout: the model did not answer in time"}, status_code=504)

    @staticmethod
    def _json(result: dict) -> dict:
        out = {k: result[k] for k in ("model", "model_version", "seeds")}
        out["images"] = [base64.b64encode(p).decode() for p in result.get("images", [])]
        if "npy" in result:
            out["npy"] = base64.b64encode(result["npy"]).decode()
        return out

    @app.post("/v1/generate", response_model=ImagesOut, response_model_exclude_none=True)
    async def generate(self, body: GenerateBody):
        result = await self._http(self._generate(body.model_copy(update={"format": "png"}) if body.grid else body))
        if not isinstance(result, dict):
            return result
        if body.grid:
            return Response(_grid(result), media_type="image/png",
                            headers={"X-Model-Version": result["model_version"], "X-Seed": str(result["seeds"][0]),
                                     "X-AI-Generated": "true"})
        return self._json(result)

    @app.post("/v1/interpolate", response_model=ImagesOut, response_model_exclude_none=True)
    async def interpolate(self, body: InterpolateBody):
        result = await self._http(self._interpolate(body))
        return self._json(result) if isinstance(result, dict) else result

    @app.post("/v1/reconstruct", response_model=ImagesOut, response_model_exclude_none=True)
    async def reconstruct(self, body: ReconstructBody):
        pngs = []
        for i, text in enumerate(body.images):
            try:
                pngs.append(base64.b64decode(text, validate=True))
            except ValueError:
                return JSONResponse({"error": f"images[{i}]: not valid base64"}, status_code=422)
        result = await self._http(self._reconstruct(body.model, pngs))
        return self._json(result) if isinstance(result, dict) else result

    @app.get("/v1/models")
    async def list_models(self):
        return {"default": self.default, "models": await self._infos()}

    @app.get("/healthz")
    async def healthz(self):
        try:
            infos = await asyncio.wait_for(self._infos(), self.options.request_timeout_s)
        except Exception as err:  # a model deployment down or stuck
            return JSONResponse({"status": "unavailable", "error": _cause(err)}, status_code=503)
        return {"status": "ok", "models": {i["name"]: i["version"] for i in infos}}

    # ---- gRPC (method names = service methods in serve/aigc.proto and grpc.health.v1) ------------

    async def _grpc(self, grpc_context, build):
        import grpc

        from aigc_ray.serving.proto import aigc_pb2

        try:
            result = await build()
        except (BadRequest, ValidationError) as err:
            msg = _field_errors(err.errors()) if isinstance(err, ValidationError) else str(err)
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(msg)
            return aigc_pb2.ImagesResponse()
        except asyncio.TimeoutError:
            grpc_context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
            grpc_context.set_details("timeout: the model did not answer in time")
            return aigc_pb2.ImagesResponse()
        return aigc_pb2.ImagesResponse(model=result["model"], model_version=result["model_version"],
                                       seeds=result["seeds"], images=result["images"])

    async def Generate(self, request, grpc_context):  # noqa: N802 (gRPC method name)
        def body():
            return GenerateBody(model=request.model or None, num_images=request.num_images,
                                seed=request.seed if request.HasField("seed") else None,
                                labels=list(request.labels) or None)
        return await self._grpc(grpc_context, lambda: self._generate(body()))

    async def Interpolate(self, request, grpc_context):  # noqa: N802
        def body():
            return InterpolateBody(model=request.model or None, seed_a=request.seed_a, seed_b=request.seed_b,
                                   steps=request.steps, label=request.label if request.HasField("label") else None)
        return await self._grpc(grpc_context, lambda: self._interpolate(body()))

    async def Reconstruct(self, request, grpc_context):  # noqa: N802
        async def run():
            if not request.images:
                raise BadRequest("images: give at least one PNG image")
            return await self._reconstruct(request.model or None, list(request.images))
        return await self._grpc(grpc_context, run)

    async def ListModels(self, request):  # noqa: N802
        from aigc_ray.serving.proto import aigc_pb2

        models = [aigc_pb2.ModelInfo(name=i["name"], version=i["version"], family=i["family"], checkpoint=i["checkpoint"],
                                     image_size=i["image_size"], channels=i["channels"], num_classes=i["num_classes"],
                                     latent_dim=i["latent_dim"], card_json=json.dumps(i["card"]) if i["card"] else "",
                                     last_error=i["last_error"]) for i in await self._infos()]
        return aigc_pb2.ListModelsResponse(models=models)

    async def Check(self, request, grpc_context):  # noqa: N802 (grpc.health.v1.Health/Check)
        import grpc
        from grpc_health.v1 import health_pb2

        if request.service not in ("", "aigc.v1.Generator"):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"service: unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        try:
            await asyncio.wait_for(self._infos(), self.options.request_timeout_s)
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def _version(*parts: Any) -> str:
    """A stable deployment version, so redeploying with only a new user_config reconfigures replicas in
    place (a hot checkpoint swap) instead of replacing them (Serve picks a random one otherwise)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_app(args: dict) -> serve.Application:
    """Application builder (`serve deploy` import path aigc_ray.serving.app:build_app); args are ServeOptions
    fields, e.g. {"checkpoints": ["runs/x/checkpoint_y"], "max_num_images": 64}."""
    options = ServeOptions(**args)
    models = {}
    for name, uri in options.models().items():
        init = {"name": name, "max_batch_images": options.max_batch_images,
                "batch_wait_timeout_s": options.batch_wait_timeout_s}
        models[name] = GeneratorModel.options(
            name=f"model-{name}", user_config={"checkpoint": uri},
            ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
            max_ongoing_requests=max(256, 2 * options.max_batch_images),
            autoscaling_config={"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                "initial_replicas": max(1, options.min_replicas),
                                "target_ongoing_requests": options.target_ongoing_requests,
                                "upscale_delay_s": 5, "downscale_delay_s": 60},
            version=_version("model", init, options.replica_cpus, options.replica_gpus), _internal=True,
        ).bind(**init)
    # The ingress needs no checkpoint URIs: keeping them out of its args and version means a checkpoint change
    # only reconfigures the model deployments; the ingress replica keeps running (no dropped requests).
    plain = {**dataclasses.asdict(options), "checkpoints": list(models)}
    env = {"env_vars": {BODY_LIMIT_ENV: str(options.max_body_bytes)}}
    return Ingress.options(ray_actor_options={"num_cpus": 0, "runtime_env": env},
                           version=_version("ingress", sorted(models), plain), _internal=True).bind(models, plain)


def start(host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000, request_timeout_s: float = 30.0) -> None:
    """Start Serve's HTTP and gRPC proxies (on the connected / a new local Ray)."""
    from ray.serve.config import HTTPOptions, gRPCOptions

    serve.start(http_options=HTTPOptions(host=host, port=http_port, request_timeout_s=request_timeout_s + 5),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS,
                                         request_timeout_s=request_timeout_s + 5))


def deploy(args: dict, blocking: bool = False) -> DeploymentHandle:
    """Deploy (or update in place: new checkpoint URIs -> reconfigure) the application."""
    return serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=blocking)


def run_until_interrupted(args: dict, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000,
                          address: str | None = None) -> int:
    """`aigc-ray serve`: deploy, print the endpoints, block until Ctrl-C, then shut Serve down."""
    import signal
    import time

    import ray

    def _stop(*_):
        raise KeyboardInterrupt

    options = ServeOptions(**args)  # validate before starting anything
    signal.signal(signal.SIGTERM, _stop)  # `kill`, container stop: same clean shutdown as Ctrl-C
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    try:
        start(host, http_port, grpc_port, options.request_timeout_s)
        deploy(dataclasses.asdict(options))
        print(f"serving {', '.join(options.models())}: http://{host}:{http_port}/docs  grpc {host}:{grpc_port} "
              "(Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down Serve", flush=True)
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
