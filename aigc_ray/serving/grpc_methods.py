"""The ingress's gRPC side: aigc.v1.Generator and grpc.health.v1.Health/Check, as methods Serve's gRPC proxy
calls by name (a mixin of app.Ingress, which supplies _generate/_interpolate/_reconstruct/_infos, token,
options and the rejection counter). Same validation, limits and token as HTTP."""

import asyncio
import json

from pydantic import ValidationError

from aigc_ray.serving.auth import bearer_ok, grpc_authorization
from aigc_ray.serving.model import BadRequest
from aigc_ray.serving.options import GenerateBody, InterpolateBody


class TooLarge(BadRequest):
    """A gRPC message over max_body_bytes: RESOURCE_EXHAUSTED, as gRPC itself answers an oversized message."""


class Overloaded(Exception):
    """The model's queue is full (Serve's max_queued_requests): 503 + Retry-After / RESOURCE_EXHAUSTED."""


class Unavailable(Exception):
    """No model replica could take the request (one died, its replacement is starting): 503 + Retry-After."""


def field_errors(errors: list[dict]) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors)


class GrpcMethods:
    def _grpc_denied(self, grpc_context) -> bool:
        import grpc

        if bearer_ok(self.token, grpc_authorization(grpc_context.invocation_metadata())):
            return False
        self.rejected.inc(tags={"reason": "unauthorized"})
        grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        grpc_context.set_details("authorization: missing or wrong bearer token (metadata 'authorization')")
        return True

    async def _grpc(self, grpc_context, build, empty=None):
        import grpc

        from aigc_ray.serving.proto import aigc_pb2

        empty = empty or aigc_pb2.ImagesResponse
        if self._grpc_denied(grpc_context):
            return empty()
        try:
            result = await build()
        except (BadRequest, ValidationError) as err:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(err, TooLarge) else grpc.StatusCode.INVALID_ARGUMENT
            grpc_context.set_code(code)
            grpc_context.set_details(field_errors(err.errors()) if isinstance(err, ValidationError) else str(err))
            return empty()
        except (Overloaded, Unavailable) as err:
            grpc_context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(err, Overloaded)
                                  else grpc.StatusCode.UNAVAILABLE)
            grpc_context.set_details(str(err))
            return empty()
        except asyncio.TimeoutError:
            grpc_context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
            grpc_context.set_details("timeout: the model did not answer in time")
            return empty()
        except Exception as err:
            grpc_context.set_code(grpc.StatusCode.INTERNAL)
            grpc_context.set_details(self._internal("gRPC request", err))
            return empty()
        if isinstance(result, dict):
            return aigc_pb2.ImagesResponse(model=result["model"], model_version=result["model_version"],
                                           seeds=result["seeds"], images=result["images"])
        return result

    def _grpc_size(self, request) -> None:
        size = request.ByteSize()
        if size > self.options.max_body_bytes:  # Serve's proxy caps messages too (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE)
            self.rejected.inc(tags={"reason": "too_large"})
            raise TooLarge(f"request: {size} bytes, over the {self.options.max_body_bytes}-byte limit")

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
            self._grpc_size(request)
            if not request.images:
                raise BadRequest("images: give at least one PNG image")
            return await self._reconstruct(request.model or None, list(request.images))
        return await self._grpc(grpc_context, run)

    async def ListModels(self, request, grpc_context):  # noqa: N802
        from aigc_ray.serving.proto import aigc_pb2

        async def run():
            return aigc_pb2.ListModelsResponse(models=[aigc_pb2.ModelInfo(
                name=i["name"], version=i["version"], family=i["family"], checkpoint=i["checkpoint"],
                image_size=i["image_size"], channels=i["channels"], num_classes=i["num_classes"],
                latent_dim=i["latent_dim"], card_json=json.dumps(i["card"]) if i["card"] else "",
                last_error=i["last_error"], modality=i.get("modality", "image")) for i in await self._infos()])
        return await self._grpc(grpc_context, run, aigc_pb2.ListModelsResponse)

    async def Complete(self, request, grpc_context):  # noqa: N802 (server streaming: one CompleteChunk per piece)
        import grpc

        from aigc_ray.serving.proto import aigc_pb2
        from aigc_ray.serving.text import AI_TEXT_LABEL, close_stream, complete_body_of_grpc, stream_items

        # Serve's gRPC proxy takes a streaming method's status from the context sent with a message, so a refusal
        # is one empty chunk carrying the status (the client's iterator then raises it)
        if self._grpc_denied(grpc_context):
            yield aigc_pb2.CompleteChunk()
            return
        code, details = None, ""
        try:
            header, stream = await self._complete_start(complete_body_of_grpc(request))  # the HTTP body's checks
        except (BadRequest, ValidationError) as err:
            code = grpc.StatusCode.INVALID_ARGUMENT
            details = field_errors(err.errors()) if isinstance(err, ValidationError) else str(err)
        except (Overloaded, Unavailable) as err:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(err, Overloaded) else grpc.StatusCode.UNAVAILABLE
            details = str(err)
        except Exception as err:
            code, details = grpc.StatusCode.INTERNAL, self._internal("gRPC Complete", err)
        if code is not None:
            grpc_context.set_code(code)
            grpc_context.set_details(details)
            yield aigc_pb2.CompleteChunk()
            return
        try:
            yield aigc_pb2.CompleteChunk(model=header["model"], model_version=header["model_version"],
                                         seed=header["seed"], ai_generated=AI_TEXT_LABEL)
            async for item in stream_items(self._next_item, stream):
                if "text" in item:
                    yield aigc_pb2.CompleteChunk(text=item["text"])
                else:
                    yield aigc_pb2.CompleteChunk(model=item["model"], model_version=item["model_version"],
                                                 seed=item["seed"], done=True, tokens=item["tokens"],
                                                 finish_reason=item["finish_reason"], ai_generated=AI_TEXT_LABEL)
        finally:  # also when the client cancels: the model stops
            await close_stream(stream)

    async def Check(self, request, grpc_context):  # noqa: N802 (grpc.health.v1.Health/Check; open without a token)
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
