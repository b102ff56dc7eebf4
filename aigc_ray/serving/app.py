"""The Serve application: one deployment `model-NAME` per checkpoint; the first one is also the FastAPI + gRPC
ingress and answers its own model in process (no second hop), the others are reached through handles.

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
import copy
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from aigc_ray.serving.auth import OPEN_PATHS, bearer_ok
from aigc_ray.serving.canary import CanaryRouter
from aigc_ray.serving.canary import deployment_name as canary_deployment
from aigc_ray.serving.grpc_methods import GrpcMethods, Overloaded, Unavailable, field_errors
from aigc_ray.serving.model import BadRequest, GeneratorModel, LocalModel, ModelCore
from aigc_ray.serving.options import (
    INGRESSES,
    GenerateBody,
    ImagesOut,
    InterpolateBody,
    ReconstructBody,
    ServeOptions,
    deployed_openapi,
)
from aigc_ray.serving.playground import add_routes as add_playground_routes
from aigc_ray.serving.text import (
    CompleteBody,
    CompleteOut,
    close_stream,
    limit_error,
    settings_of,
    sse,
    stream_items,
    text_openapi,
)

GRPC_SERVICERS = ["aigc_ray.serving.proto.aigc_pb2_grpc.add_GeneratorServicer_to_server",
                  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
APP_NAME = "aigc"
RETRY_AFTER_S = 1
HEADROOM = 16  # requests beyond the model's bound the ingress replica still takes: health, /v1/models, sheds
PROXY_QUEUE_FACTOR = 4  # the proxy's queue for the ingress, in units of the ingress's own bound
# How often Serve's controller asks each replica if it lives (Serve's default: 10 s). A replica that died
# (a node lost, an OOM kill) is found at its next check and only then replaced, so this bounds how long
# its share of the traffic waits; a check is one small call. A busy replica still has Serve's 30 s to answer.
HEALTH_CHECK_PERIOD_S = 2
HAPROXY_DRAIN_S = 2  # behind this node's HAProxy: how long a leaving replica stays reachable (use_haproxy_ingress)
logger = logging.getLogger("ray.serve")


_field_errors = field_errors


def _live() -> dict:
    """This ingress replica's runtime state (token, limits, metrics), set by Ingress.__init__. Reached through
    the module at call time: Serve pickles the ingress class by value, so a global it wrote would be a copy."""
    from aigc_ray.serving import options

    return options.RUNTIME


# Our own /openapi.json (a method of the ingress, with the deployed limits) and /docs pointing at it.
app = FastAPI(title="aigc-ray", version="1", openapi_url=None, docs_url=None, redoc_url=None,
              description="Generate, interpolate and reconstruct images with GANs and VAEs trained by aigc-ray. "
                          "Every PNG carries tEXt metadata marking it AI-generated. With a token configured, "
                          "send `Authorization: Bearer <token>`.")


def _reject(reason: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    counter = _live().get("rejected")
    if counter is not None:
        counter.inc(tags={"reason": reason})
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Guard:
    """Bearer token and body limit before anything else runs: 401 / 413. A plain ASGI middleware: Starlette's
    @app.middleware("http") (BaseHTTPMiddleware) costs about a millisecond of CPU per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        live, headers = _live(), dict(scope["headers"])
        auth = headers.get(b"authorization")
        if scope["path"] not in OPEN_PATHS and not bearer_ok(live.get("token", ""), auth and auth.decode("latin-1")):
            return await _reject("unauthorized", 401, "authorization: missing or wrong bearer token",
                                 {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        limit = live.get("max_body_bytes", ServeOptions.max_body_bytes)

        def too_large() -> JSONResponse:
            return _reject("too_large", 413, f"body: larger than the {limit}-byte limit")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_large()(scope, receive, send)
        if length is None and scope["method"] == "POST":  # chunked: count what arrives, then replay it
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return await self.app(scope, receive, send)  # the client went away
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await too_large()(scope, receive, send)
            replayed = False

            async def receive_body():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await self.app(scope, receive_body, send)
        return await self.app(scope, receive, send)


app.add_middleware(Guard)
add_playground_routes(app)  # GET /: the web playground (serving/playground/), open like /docs


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError):
    detail = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
    return JSONResponse({"error": _field_errors(exc.errors()), "detail": json.loads(json.dumps(detail, default=str))},
                        status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException):  # e.g. a body that is not UTF-8 JSON (400)
    return JSONResponse({"error": f"body: {exc.detail}" if exc.status_code == 400 else str(exc.detail)},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


_ERROR = {"content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}}
ERRORS = {400: {**_ERROR, "description": "body is not JSON"}, 401: {**_ERROR, "description": "bearer token missing"},
          404: {**_ERROR, "description": "unknown model"}, 413: {**_ERROR, "description": "body too large"},
          503: {**_ERROR, "description": "overloaded or no replica; see Retry-After"}}


def _server_timing(model_ms: dict, ingress_s: float) -> str:
    parts = {"ingress": ingress_s * 1e3, **model_ms}
    return ", ".join(f"{k};dur={v:.2f}" for k, v in parts.items())


class UnknownModel(BadRequest):
    pass


def _cause(err: BaseException) -> str:
    """The user-facing message of an exception raised in a model replica (not Ray's traceback)."""
    return str(getattr(err, "cause", None) or err)


def _grid(result: dict) -> bytes:
    import torch

    from aigc_ray.images import decode_png
    from aigc_ray.pipeline import grid_png
    from aigc_ray.serving.model import png_text

    images = torch.stack([decode_png(p) for p in result["images"]])
    text = png_text(result["model_version"], result["seeds"][0])
    return grid_png(images, nrow=max(1, round(len(images) ** 0.5)), text=text)


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress(GrpcMethods):
    def __init__(self, models: dict[str, DeploymentHandle | None], options: dict, canaries: dict | None = None,
                 local: dict | None = None):
        # `models`: a handle per model deployment; None for the model this replica runs itself (`local`: its
        # ModelCore arguments; Serve calls reconfigure() with its checkpoint).
        # `canaries` (candidate deployments) is bound only to make them part of the app; the router finds them by
        # name, so an ingress replica started before a canary (its version ignores canaries) routes to it too
        from ray.serve.metrics import Counter

        from aigc_ray.serving import options as live
        from aigc_ray.serving.auth import resolve_token

        self.models, self.options = dict(models), ServeOptions(**options)
        self.local = None
        if local is not None:
            self.local = LocalModel(ModelCore(**local), self.options.max_ongoing_requests +
                                    self.options.max_queued_requests)
            self.models[local["name"]] = self.local
        self.default = next(iter(models))
        self.rejected = Counter("aigc_requests_rejected", description="Requests refused before reaching a model "
                                "(reason: overloaded, unauthorized, too_large).", tag_keys=("reason",))
        self.token = resolve_token(self.options.api_token_env, self.options.api_token_file)
        live.RUNTIME.update(token=self.token, max_body_bytes=self.options.max_body_bytes, rejected=self.rejected)
        self._infos_cache: tuple[float, list[dict]] = (0.0, [])
        self.canaries = CanaryRouter(serve.get_replica_context().app_name, list(models))

    # ---- the in-process model: Serve's calls (user_config, health) and promote's info() -----------

    def reconfigure(self, user_config: dict) -> None:
        if self.local is not None:
            self.local.core.reconfigure(user_config)

    def check_health(self) -> None:
        if self.local is not None:
            self.local.core.check_health()

    def info(self) -> dict:
        return self.local.core.info() if self.local is not None else {}

    # ---- shared core (HTTP and gRPC) -------------------------------------------------------

    async def _handle(self, name: str | None, op: str = "generate") -> tuple[str, DeploymentHandle]:
        if name is None and op == "complete":  # the first text model
            able = [i["name"] for i in await self._infos(max_age_s=10.0) if i.get("can_complete")]
            if not able:
                raise UnknownModel("model: no served model is a text model (POST /v1/complete needs one)")
            name = able[0]
        if name is None and op == "reconstruct":  # the first model with an encoder
            able = [i["name"] for i in await self._infos(max_age_s=10.0) if i["can_reconstruct"]]
            if not able:
                raise UnknownModel("model: no served model can reconstruct (needs a vae or ae)")
            name = able[0]
        name = name or self.default
        if name not in self.models:
            raise UnknownModel(f"model: unknown model {name!r}; served: {', '.join(self.models)}")
        return name, self.models[name]

    def _check_count(self, field: str, n: int) -> None:
        if n > self.options.max_num_images:
            raise BadRequest(f"{field}: {n} exceeds the limit of {self.options.max_num_images} images per request")

    async def _routed(self, name: str, handle: "DeploymentHandle | LocalModel", run):
        """`run(role, handle)` on model `name`'s candidate for a canary's share of requests, else on its current
        version. What the candidate fails, or does not do within its time bound, is counted against it (`run`
        counts) and done again by the current version."""
        await self.canaries.refresh()
        role, candidate = self.canaries.pick(name)
        if candidate is not None:
            try:
                return await asyncio.wait_for(run("canary", candidate),
                                              min(self.canaries.timeout_s(name), self.options.request_timeout_s))
            except BadRequest:
                raise
            except Exception as err:
                logger.warning("model %s: the candidate failed (%s); answered by the current version", name,
                               type(err).__name__)
        return await run("current", handle)

    async def _call(self, name: str, handle: DeploymentHandle, method: str, *args) -> dict:
        """Call model `name` (or its canary's candidate, _routed)."""
        return await self._routed(name, handle, lambda role, h: self._call_version(name, role, h, method, *args))

    async def _call_version(self, name: str, role: str, handle: DeploymentHandle, method: str, *args) -> dict:
        started = time.perf_counter()
        try:
            result = await self._call_once(handle, method, *args)
        except BadRequest:
            self.canaries.count(name, role, None, True, started)  # the client's fault, not the version's
            raise
        except BaseException:
            self.canaries.count(name, role, None, False, started)
            raise
        self.canaries.count(name, role, result.get("model_version"), True, started)
        return result

    async def _call_once(self, handle: "DeploymentHandle | LocalModel", method: str, *args) -> dict:
        try:
            call = handle.call(method, *args) if isinstance(handle, LocalModel) else getattr(handle, method).remote(*args)
            return await asyncio.wait_for(call, self.options.request_timeout_s)
        except BadRequest as err:
            raise BadRequest(_cause(err)) from None
        except (BackPressureError, LocalModel.Full):
            self.rejected.inc(tags={"reason": "overloaded"})
            raise Overloaded("model: overloaded, its queue is full; retry later") from None
        except (RayActorError, DeploymentUnavailableError) as err:
            logger.warning("model call failed: %s", type(err).__name__)
            raise Unavailable("model: no replica available right now; retry later") from None

    async def _generate(self, body: GenerateBody) -> dict:
        name, handle = await self._handle(body.model)
        self._check_count("num_images", body.num_images)
        if body.labels is not None and len(body.labels) not in (1, body.num_images):
            raise BadRequest(f"labels: give 1 label or num_images ({body.num_images}), got {len(body.labels)}")
        seed = secrets.randbelow(2**31) if body.seed is None else body.seed
        seeds = [seed + i for i in range(body.num_images)]
        return await self._call(name, handle, "generate_array" if body.format == "npy" else "generate", seeds,
                                body.labels)

    async def _interpolate(self, body: InterpolateBody) -> dict:
        name, handle = await self._handle(body.model)
        self._check_count("steps", body.steps)
        return await self._call(name, handle, "interpolate", body.seed_a, body.seed_b, body.steps, body.label)

    async def _reconstruct(self, body_model: str | None, pngs: list[bytes]) -> dict:
        name, handle = await self._handle(body_model, "reconstruct")
        self._check_count("images", len(pngs))
        for i, png in enumerate(pngs):
            if len(png) > self.options.max_image_bytes:
                raise BadRequest(f"images[{i}]: {len(png)} bytes, over the {self.options.max_image_bytes}-byte "
                                 "limit per image")
        return await self._call(name, handle, "reconstruct", pngs)

    async def _complete_start(self, body: CompleteBody) -> tuple[dict, Any]:
        """Check the request against the deployment's limits, start the model's token stream and wait for its
        header (errors then are still a plain 4xx/503): (header, the rest of the stream). A canary's share goes
        to its candidate (_routed): one that cannot start the stream within its time bound failed that request,
        and the current version answers it."""
        name, handle = await self._handle(body.model, "complete")
        error = limit_error(body, self.options.max_prompt_chars, self.options.max_new_tokens)
        if error:
            raise BadRequest(error)
        settings = settings_of(body)
        return await self._routed(name, handle,
                                  lambda role, h: self._start_version(name, role, h, body.prompt, settings))

    async def _start_version(self, name: str, role: str, handle: "DeploymentHandle | LocalModel", prompt: str,
                             settings: dict) -> tuple[dict, Any]:
        """One version's token stream, started: counted for the canary verdict once its header came (or not). A
        stream that fails after its header has sent text already: the client sees that, no other version can
        answer it instead."""
        started = time.perf_counter()
        if isinstance(handle, LocalModel):
            stream = handle.stream("complete_stream", prompt, settings)
        else:
            stream = handle.options(stream=True).complete_stream.remote(prompt, settings)
        try:
            header = await self._next_item(stream)
        except BaseException as err:
            await close_stream(stream)
            self.canaries.count(name, role, None, isinstance(err, BadRequest), started)  # a bad request: not its fault
            raise
        self.canaries.count(name, role, header.get("model_version"), True, started)
        return header, stream

    async def _next_item(self, stream) -> dict:
        try:
            return await asyncio.wait_for(stream.__anext__(), self.options.request_timeout_s)
        except BadRequest as err:
            raise BadRequest(_cause(err)) from None
        except (BackPressureError, LocalModel.Full):
            self.rejected.inc(tags={"reason": "overloaded"})
            raise Overloaded("model: overloaded, its queue is full; retry later") from None
        except (RayActorError, DeploymentUnavailableError) as err:
            logger.warning("model call failed: %s", type(err).__name__)
            raise Unavailable("model: no replica available right now; retry later") from None

    async def _complete_all(self, body: CompleteBody) -> dict:
        header, stream = await self._complete_start(body)
        pieces, last = [], header
        try:
            async for item in stream_items(self._next_item, stream):
                if "text" in item:
                    pieces.append(item["text"])
                else:
                    last = item
        finally:
            await close_stream(stream)
        return {**last, "text": "".join(pieces)}

    async def _infos(self, max_age_s: float = 0.0) -> list[dict]:
        at, infos = self._infos_cache
        if not infos or time.monotonic() - at > max_age_s:
            infos = list(await asyncio.gather(*(h.call("info") if isinstance(h, LocalModel) else h.info.remote()
                                                for h in self.models.values())))
            self._infos_cache = (time.monotonic(), infos)
        return infos

    def _internal(self, where: str, err: BaseException) -> str:
        ref = secrets.token_hex(4)
        logger.error("%s failed [%s]: %s: %s", where, ref, type(err).__name__, err)
        return f"internal error (logged as {ref})"  # never the traceback or a path

    # ---- HTTP ------------------------------------------------------------------------------------

    async def _http(self, coro) -> Any:
        try:
            return await coro
        except UnknownModel as err:
            return JSONResponse({"error": str(err)}, status_code=404)
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=422)
        except (Overloaded, Unavailable) as err:
            return JSONResponse({"error": str(err)}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        except asyncio.TimeoutError:
            return JSONResponse({"error": "timeout: the model did not answer in time"}, status_code=504)
        except Exception as err:  # a fault of ours, not of the request
            return JSONResponse({"error": self._internal("request", err)}, status_code=500)

    @staticmethod
    def _json(result: dict) -> dict:
        out = {k: result[k] for k in ("model", "model_version", "seeds")}
        out["images"] = [base64.b64encode(p).decode() for p in result.get("images", [])]
        if "npy" in result:
            out["npy"] = base64.b64encode(result["npy"]).decode()
        return out

    @app.post("/v1/generate", response_model=ImagesOut, response_model_exclude_none=True,
              responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "JSON, or with grid: one PNG"}})
    async def generate(self, body: GenerateBody, response: Response):
        started = time.perf_counter()
        result = await self._http(self._generate(body.model_copy(update={"format": "png"}) if body.grid else body))
        if not isinstance(result, dict):
            return result
        if "timing_ms" in result:  # hop by hop: ingress total, the model replica's share and its parts
            response.headers["Server-Timing"] = _server_timing(result["timing_ms"], time.perf_counter() - started)
        if body.grid:
            return Response(_grid(result), media_type="image/png",
                            headers={"X-Model-Version": result["model_version"], "X-Seed": str(result["seeds"][0]),
                                     "X-AI-Generated": "true"})
        return self._json(result)

    @app.post("/v1/interpolate", response_model=ImagesOut, response_model_exclude_none=True,
              responses=ERRORS)
    async def interpolate(self, body: InterpolateBody):
        result = await self._http(self._interpolate(body))
        return self._json(result) if isinstance(result, dict) else result

    @app.post("/v1/reconstruct", response_model=ImagesOut, response_model_exclude_none=True,
              responses=ERRORS)
    async def reconstruct(self, body: ReconstructBody):
        pngs, cap = [], self.options.max_image_bytes
        for i, text in enumerate(body.images):
            if len(text) > 4 * (cap // 3 + 1):  # refuse before decoding
                return JSONResponse({"error": f"images[{i}]: over the {cap}-byte limit per image"}, status_code=422)
            try:
                pngs.append(base64.b64decode(text, validate=True))
            except ValueError:
                return JSONResponse({"error": f"images[{i}]: not valid base64"}, status_code=422)
        result = await self._http(self._reconstruct(body.model, pngs))
        return self._json(result) if isinstance(result, dict) else result

    @app.post("/v1/complete", response_model=CompleteOut, responses={
        **ERRORS, 200: {"content": {"text/event-stream": {}},
                        "description": "JSON, or with stream: server-sent events (start, a data event per piece, done)"}})
    async def complete(self, body: CompleteBody):
        """Continue a prompt with a text model. With `stream`, pieces arrive as server-sent events as each token
        is produced; a client that disconnects stops its generation. Marked AI-generated in the body and the
        X-AI-Generated header."""
        if not body.stream:
            result = await self._http(self._complete_all(body))
            if not isinstance(result, dict):
                return result
            return JSONResponse(result, headers={"X-AI-Generated": "true", "X-Model-Version": result["model_version"]})
        started = await self._http(self._complete_start(body))
        if not isinstance(started, tuple):
            return started
        header, stream = started

        async def events():
            try:
                yield sse(header, "start")
                async for item in stream_items(self._next_item, stream):
                    yield sse(item) if "text" in item else sse(item, "done")
            except Exception as err:  # mid-stream: the status is sent; say it in the stream, never a traceback
                message = str(err) if isinstance(err, (BadRequest, Overloaded, Unavailable)) else (
                    "timeout: the model did not answer in time" if isinstance(err, asyncio.TimeoutError)
                    else self._internal("stream", err))
                yield sse({"error": message}, "error")
            finally:  # also on a disconnect (Starlette cancels this generator): the model stops
                await close_stream(stream)
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"X-AI-Generated": "true", "X-Model-Version": header["model_version"],
                                          "Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def list_models(self):
        return await self._http(self._list_models())

    async def _list_models(self) -> dict:
        await self.canaries.refresh()
        infos = [{**i, "canary": self.canaries.status(i["name"])} for i in await self._infos()]
        return {"default": self.default, "models": infos}

    @app.get("/healthz")
    async def healthz(self):
        try:
            infos = await asyncio.wait_for(self._infos(), self.options.request_timeout_s)
        except Exception as err:  # a model deployment down or stuck
            logger.warning("healthz: %s", _cause(err)[:500])
            return JSONResponse({"status": "unavailable", "error": "a model deployment did not answer"},
                                status_code=503)
        return {"status": "degraded" if any(i["degraded"] for i in infos) else "ok",
                "models": {i["name"]: i["version"] for i in infos}}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        infos = await self._infos(max_age_s=10.0)
        generators = [i for i in infos if i["can_generate"]]
        deployed = {"max_num_images": self.options.max_num_images, "generate": [i["name"] for i in generators],
                    "reconstruct": [i["name"] for i in infos if i["can_reconstruct"]],
                    "num_classes": max([i["num_classes"] for i in generators] or [0])}
        schema = deployed_openapi(copy.deepcopy(request.app.openapi()), deployed)
        return text_openapi(schema, self.options.max_prompt_chars, self.options.max_new_tokens,
                            [i["name"] for i in infos if i.get("can_complete")])

    @app.get("/docs", include_in_schema=False)
    async def docs(self):
        return get_swagger_ui_html(openapi_url="/openapi.json", title="aigc-ray")


def _version(*parts: Any) -> str:
    """A stable deployment version, so redeploying with only a new user_config reconfigures replicas in
    place (a hot checkpoint swap) instead of replacing them (Serve picks a random one otherwise)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_app(args: dict) -> serve.Application:
    """Application builder (`serve deploy` import path aigc_ray.serving.app:build_app); args are ServeOptions
    fields, e.g. {"checkpoints": ["runs/x/checkpoint_y"], "max_num_images": 64}."""
    options = ServeOptions(**args)
    served = options.models()
    first = next(iter(served))
    models: dict[str, Any] = {first: None}  # the first model runs inside the ingress replica
    canaries = {}
    replicas = {"ray_actor_options": {"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
                "logging_config": {"enable_access_log": options.access_log},
                "autoscaling_config": {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                       "initial_replicas": max(1, options.min_replicas),
                                       "target_ongoing_requests": options.target_ongoing_requests,
                                       "upscale_delay_s": 5, "downscale_delay_s": 60}}
    resources = (options.replica_cpus, options.replica_gpus, options.max_ongoing_requests, options.max_queued_requests)

    def init(name: str, role: str = "current") -> dict:
        return {"name": name, "max_batch_images": options.max_batch_images,
                "batch_wait_timeout_s": options.batch_wait_timeout_s, **({"role": role} if role == "canary" else {})}

    for name, uri, role in [*((n, u, "current") for n, u in served.items() if n != first),
                            *((n, u, "canary") for n, u in options.canaries.items())]:
        (models if role == "current" else canaries)[name] = GeneratorModel.options(
            name=f"model-{name}" if role == "current" else canary_deployment(name), user_config={"checkpoint": uri},
            max_ongoing_requests=options.max_ongoing_requests, max_queued_requests=options.max_queued_requests,
            version=_version("model", init(name, role), *resources), health_check_period_s=HEALTH_CHECK_PERIOD_S,
            _internal=True, **replicas,
        ).bind(**init(name, role))
    # No checkpoint URI in the ingress's args or version: a checkpoint change only reconfigures replicas in place
    # (user_config), nothing restarts and no request is dropped. The ingress replica bounds its own model's queue
    # (LocalModel) and answers 503 itself; Serve's bound at the proxy stays as a second line. That line is
    # wider (PROXY_QUEUE_FACTOR): a burst waits there until the ingress answers the router's probe, and on a
    # starved CPU a burst of 48 once filled a queue of 28 before the ingress could shed anything itself (the
    # proxy's 503 is plain text). Where the proxy does shed, it still says Retry-After (backpressure_config).
    plain = {**dataclasses.asdict(options), "checkpoints": list(served), "canaries": {}}
    bound = options.max_ongoing_requests + options.max_queued_requests + HEADROOM
    return Ingress.options(name=f"model-{first}", user_config={"checkpoint": served[first]},
                           max_ongoing_requests=bound, max_queued_requests=PROXY_QUEUE_FACTOR * bound,
                           backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
                           version=_version("ingress", init(first), resources, plain),
                           health_check_period_s=HEALTH_CHECK_PERIOD_S, _internal=True, **replicas,
                           ).bind(models, plain, canaries, init(first))


def start(host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000, request_timeout_s: float = 30.0,
          access_log: bool = True) -> None:
    """Start Serve's HTTP and gRPC proxies (on the connected / a new local Ray)."""
    from ray.serve.config import HTTPOptions, gRPCOptions

    serve.start(http_options=HTTPOptions(host=host, port=http_port, request_timeout_s=request_timeout_s + 5),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICERS,
                                         request_timeout_s=request_timeout_s + 5),
                logging_config=_serve_logging(access_log))


def _serve_logging(access_log: bool) -> dict:
    """Serve's controller, proxies and replicas log at INFO; a command's quiet console (no -v) keeps their warnings."""
    from aigc_ray import console

    return {"enable_access_log": access_log, **({} if console.verbose() else {"log_level": "WARNING"})}


def deploy(args: dict, blocking: bool = False, name: str = APP_NAME) -> DeploymentHandle:
    """Deploy (or update in place: new checkpoint URIs -> reconfigure) the application. The args are kept in
    Ray's GCS, where `aigc-ray promote` finds them to swap a checkpoint (serving/rollout.py)."""
    from aigc_ray.serving import rollout

    if blocking:
        rollout.remember_args(name, args)
    handle = serve.run(build_app(args), name=name, route_prefix="/", blocking=blocking)
    rollout.remember_args(name, args)
    return handle


def check_exposure(options: ServeOptions, host: str, insecure: bool = False) -> str:
    """The token the deployment will require ("" = none); refuses a non-loopback host without one unless
    `insecure`. Ray's gRPC proxy binds every interface whatever `host` says, so the token guards gRPC too."""
    from aigc_ray.serving.auth import is_loopback, resolve_token

    token = resolve_token(options.api_token_env, options.api_token_file)
    if not token and not is_loopback(host) and not insecure:
        raise ValueError(f"--host {host}: serving beyond this machine needs a bearer token (set {options.api_token_env} "
                         "or --api-token-file), or --insecure to serve without one")
    return token


def use_haproxy_ingress() -> dict[str, int]:
    """Serve's HAProxy ingress, for a Ray this process is about to start (Serve's controller reads the
    switch from the environment it starts in). HAProxy listens on --host's HTTP and gRPC ports and sends
    each request straight to a replica's own HTTP / gRPC server (Serve's "direct ingress"), instead of
    through Ray's Python proxy actor: on this 2-core machine the proxy hop cost 12-24 ms of a request's
    15-31 ms (bench/results/serve_load.md). HAProxy also opens a stats page and a Prometheus endpoint on
    every interface (Ray 2.60 has no bind address for them); they get free ports rather than the fixed
    8404 / 9101, so a second server on the machine, or whatever holds those ports, is not in the way.
    Returns {"stats": port, "metrics": port}."""
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    # A replica that leaves (Ctrl-C, a downscale) first stays reachable this long, then refuses new
    # connections (HAProxy retries those on another replica) and finishes what it has. Serve's 30 s default
    # gives a load balancer elsewhere time to deregister it; here HAProxy runs on this node and Ray reloads
    # it within about a second of the change. With 30 s, Ctrl-C took 30 s to stop the server.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", str(HAPROXY_DRAIN_S))
    ports = {}
    for name in ("stats", "metrics"):
        key = f"RAY_SERVE_HAPROXY_{name.upper()}_PORT"
        os.environ[key] = os.environ.get(key) or str(free_port())
        ports[name] = int(os.environ[key])
    return ports


def run_until_interrupted(args: dict, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 9000,
                          address: str | None = None, insecure: bool = False, ingress: str = "proxy") -> int:
    """`aigc-ray serve`: deploy, print the endpoints, block until Ctrl-C, then shut Serve down. ``ingress``:
    "proxy" (Ray Serve's proxy actors) or "haproxy" (``use_haproxy_ingress``; only for a Ray this starts)."""
    import signal
    import time

    import ray

    def _stop(*_):
        raise KeyboardInterrupt

    options = ServeOptions(**args)  # validate before starting anything
    token = check_exposure(options, host, insecure)
    address = address or os.environ.get("RAY_ADDRESS")
    own_ray = address in (None, "", "local")
    if ingress not in INGRESSES:
        raise ValueError(f"--ingress {ingress}: expected one of {', '.join(INGRESSES)}")
    if ingress == "haproxy" and not own_ray:
        raise ValueError(f"--ingress haproxy: a running cluster ({address}) chose its ingress when it started; start "
                         "it with RAY_SERVE_ENABLE_HA_PROXY=1 in its environment (ray start, the RayService's env), "
                         "or let aigc-ray serve start its own Ray")
    haproxy_ports = use_haproxy_ingress() if ingress == "haproxy" else {}
    # Serve's gRPC proxy reads its message cap from the environment it starts in (a local Ray inherits ours)
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(options.max_body_bytes + 64 * 1024))
    if own_ray:  # our own Ray: its workers are the server, not background
        os.environ.setdefault("RAY_worker_niceness", "0")  # work (Ray nices every worker by 15 by default)
    from aigc_ray import console

    ray.init(address=address or None, ignore_reinit_error=True, **console.ray_init_kwargs())
    # after ray.init, which installs a SIGTERM handler of its own that aborts the process (exit 134)
    signal.signal(signal.SIGTERM, _stop)  # `kill`, container stop: same clean shutdown as Ctrl-C
    try:
        start(host, http_port, grpc_port, options.request_timeout_s, options.access_log)
        deploy(dataclasses.asdict(options))
        print(f"serving {', '.join(options.models())}: http://{host}:{http_port}/ (playground; API at /docs)  "
              f"grpc {host}:{grpc_port} "
              f"{'(bearer token required) ' if token else ''}(Ctrl-C to stop)", flush=True)
        if haproxy_ports:
            print(f"ingress: HAProxy (stats http://{host}:{haproxy_ports['stats']}/stats, metrics "
                  f":{haproxy_ports['metrics']}/metrics, both on every interface)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down Serve", flush=True)
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
