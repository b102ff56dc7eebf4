"""Text completion in the Serve app: the request body, the model side's token stream, and the SSE framing.

POST /v1/complete {prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, stream, model?}
  stream false: one JSON answer {model, model_version, text, seed, tokens, finish_reason, ai_generated}
  stream true:  text/event-stream: `data: {"text": ...}` per piece as it is produced, then
                `event: done` with the same fields as the JSON answer less the text
Every answer says it is AI-made: the `ai_generated` field and the `X-AI-Generated: true` header.

Limits: prompt length (max_prompt_chars) and max_new_tokens are the deployment's (ServeOptions), written into
the deployed OpenAPI; over them is a 422 naming the field. The vocabulary is the 256 byte values, so any
prompt is in vocabulary (its UTF-8 bytes): nothing is mapped or refused for its characters.
A client that disconnects cancels its stream: no further token is computed.
"""

# No `from __future__ import annotations` (Serve re-binds the routes; see options.py).
import asyncio
import contextlib
import json
import secrets
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from aigc_ray.serving.options import MAX_SEED, _json_integer

AI_TEXT_LABEL = "true: this text was made by a generative model"
HARD_MAX_PROMPT_CHARS, HARD_MAX_NEW_TOKENS = 65536, 16384  # schema caps; the deployment's limits sit below


class CompleteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="served text model name (GET /v1/models); default: the first "
                                                "text model")
    prompt: str = Field("", max_length=HARD_MAX_PROMPT_CHARS,
                        description="the text to continue (any Unicode: the model reads its UTF-8 bytes); at most "
                                    "max_prompt_chars characters")
    max_new_tokens: Annotated[int, BeforeValidator(_json_integer)] = Field(
        128, ge=1, le=HARD_MAX_NEW_TOKENS, description="bytes to generate at most (1..the deployment's limit)")
    temperature: float = Field(0.8, ge=0.0, le=10.0, description="0 = greedy")
    top_k: Annotated[int, BeforeValidator(_json_integer)] = Field(0, ge=0, le=256, description="0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling; 1 = off")
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_json_integer)] | None = Field(
        None, description="same seed + prompt + settings + model version = same text; absent = random")
    stop: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=8, description="stop before the first of these strings")
    stream: bool = Field(False, strict=True, description="answer with server-sent events, a piece per token")


class CompleteOut(BaseModel):
    model: str
    model_version: str
    text: str
    seed: int
    tokens: int
    finish_reason: str = Field(..., description="length (max_new_tokens reached) | stop (a stop string)")
    ai_generated: str = AI_TEXT_LABEL


def complete_body_of_grpc(request) -> CompleteBody:
    """aigc.v1.CompleteRequest -> the HTTP body, so both sides share one validation and one set of defaults:
    a field the message leaves unset (proto3: 0 for max_new_tokens, absent for the optional ones) is left
    to CompleteBody's default. Raises pydantic's ValidationError, as the HTTP body does."""
    fields = {"model": request.model or None, "prompt": request.prompt, "top_k": request.top_k,
              "stop": list(request.stop)}
    if request.max_new_tokens:
        fields["max_new_tokens"] = request.max_new_tokens
    fields |= {f: getattr(request, f) for f in ("temperature", "top_p", "seed") if request.HasField(f)}
    return CompleteBody(**fields)


def limit_error(body: CompleteBody, max_prompt_chars: int, max_new_tokens: int) -> str | None:
    """The deployment's limits (ServeOptions) on a request, HTTP or gRPC: the message naming the field, or None."""
    if len(body.prompt) > max_prompt_chars:
        return f"prompt: {len(body.prompt)} characters, over the limit of {max_prompt_chars}"
    if body.max_new_tokens > max_new_tokens:
        return f"max_new_tokens: {body.max_new_tokens} exceeds the limit of {max_new_tokens}"
    return None


async def stream_items(next_item, stream):
    """The items of a model's token stream, each awaited through ``next_item`` (the ingress's bounded wait);
    the caller closes the stream (close_stream) when it is done or cancelled."""
    while True:
        try:
            item = await next_item(stream)
        except StopAsyncIteration:
            return
        yield item


def settings_of(body: CompleteBody) -> dict:
    """The sampling settings a model replica is sent (a plain dict: it crosses a Ray call)."""
    return {"max_new_tokens": body.max_new_tokens, "temperature": body.temperature, "top_k": body.top_k,
            "top_p": body.top_p, "seed": secrets.randbelow(2**31) if body.seed is None else body.seed,
            "stop": list(body.stop)}


def text_openapi(schema: dict, max_prompt_chars: int, max_new_tokens: int, text_models: list[str]) -> dict:
    """The deployment's text limits in the OpenAPI document; no text model served: no /v1/complete."""
    bodies = schema.get("components", {}).get("schemas", {})
    if not text_models:
        schema.get("paths", {}).pop("/v1/complete", None)
        bodies.pop("CompleteBody", None)
        return schema
    if "CompleteBody" in bodies:
        props = bodies["CompleteBody"]["properties"]
        props["prompt"]["maxLength"] = max_prompt_chars
        props["max_new_tokens"]["maximum"] = max_new_tokens
        props["model"]["anyOf"] = [{"type": "string", "enum": list(text_models)}, {"type": "null"}]
    return schema


async def token_stream(pipe, name: str, prompt: str, settings: dict, counters: dict, observe=None):
    """The model side (ModelCore.complete_stream): a header item, text pieces, then a done item.
    Each token is computed in a worker thread, one at a time, so the replica's event loop stays free; when
    the consumer goes away (a disconnect cancels it) no further token is computed."""
    from aigc_ray.text_pipeline import SamplingSettings

    s = SamplingSettings(**settings)
    progress: dict = {}
    pieces = pipe.stream(prompt, s, progress)
    done = object()
    header = {"model": name, "model_version": pipe.version, "seed": s.seed}
    yield header
    finished = False
    counters["active"] += 1
    try:
        while True:
            piece = await asyncio.to_thread(next, pieces, done)
            if piece is done:
                break
            yield {"text": piece}
        finished = True
        yield {**header, "tokens": progress["tokens"], "finish_reason": progress["finish_reason"],
               "ai_generated": AI_TEXT_LABEL}
    finally:
        counters["active"] -= 1
        counters["tokens"] += progress.get("tokens", 0)
        if observe is not None:  # the replica's metrics (ModelCore: aigc_text_tokens_generated)
            observe(progress.get("tokens", 0), finished)
        if not finished:
            counters["cancelled"] += 1
        try:
            pieces.close()
        except ValueError:  # cancelled while its current token computes in the thread: it stops after that one
            pass


async def close_stream(stream) -> None:
    """End a model's token stream early: an in-process async generator is closed, a handle's is cancelled. A
    handle's stream that failed already (refused by the model's queue bound, its replica gone) has nothing left
    to stop, and Serve's cancel() raises that failure again: the caller has it in hand already (it made a 503 of
    a refusal), so here it would only turn into a 500."""
    if hasattr(stream, "aclose"):
        await stream.aclose()
    elif hasattr(stream, "cancel"):
        with contextlib.suppress(Exception):
            stream.cancel()


def sse(event: dict[str, Any], kind: str | None = None) -> bytes:
    return ((f"event: {kind}\n" if kind else "") + f"data: {json.dumps(event)}\n\n").encode()
