"""What a deployment is configured with (ServeOptions) and what a request may say (pydantic bodies).

The bodies carry schema-level caps; the deployed limits (max_num_images, the served model names, which
models are class-conditional) are written into /openapi.json by `deployed_openapi`, so the published
schema says exactly what the deployment accepts.
"""

# No `from __future__ import annotations`: Serve re-binds the FastAPI routes of the ingress class and string
# annotations of request bodies then fail to resolve (pydantic "not fully defined").
import dataclasses
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

INGRESSES = ("proxy", "haproxy")  # `aigc-ray serve --ingress`: what takes requests in (serving/app.use_haproxy_ingress)

HARD_MAX_IMAGES = 4096  # schema-level cap; the configured max_num_images is checked on top
MAX_SEED = 2**53 - 1  # exact in every JSON parser (a double): a larger bound is read differently by clients


@dataclasses.dataclass
class ServeOptions:
    checkpoints: list = dataclasses.field(default_factory=list)
    """Checkpoints to serve: "PATH_OR_URI", "NAME=PATH_OR_URI" or {"name", "checkpoint"}. The first is the
    default model; a name defaults to the run directory's name (the checkpoint's parent)."""
    max_num_images: int = 64
    """Most images one request may ask for (generate num_images, interpolate steps, reconstruct images)."""
    max_batch_images: int = 64
    """Most images in one forward pass; @serve.batch packs requests up to this many images (1 = no batching)."""
    batch_wait_timeout_s: float = 0.0
    """How long a batch waits for more requests after its first one. 0: a batch takes what is queued when the
    model is free and never waits on an empty queue (under load, requests queue during the forward pass)."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body, HTTP (413 above it) and gRPC (RESOURCE_EXHAUSTED)."""
    max_image_bytes: int = 1024 * 1024
    """Largest single PNG taken by reconstruct (after base64 decoding)."""
    request_timeout_s: float = 30.0
    """A request not answered in this time gets 504 / DEADLINE_EXCEEDED instead of hanging."""
    min_replicas: int = 1
    """Autoscaling floor per model deployment."""
    max_replicas: int = 2
    """Autoscaling ceiling per model deployment."""
    target_ongoing_requests: float = 8.0
    """Autoscaling target of in-flight requests per model replica."""
    max_ongoing_requests: int = 32
    """Requests one model replica works on at once (what @serve.batch can pack); more wait in the queue."""
    max_queued_requests: int = 64
    """Requests waiting per model beyond max_ongoing_requests (per replica of the first model, which runs in the
    ingress; at each caller for the others); more get 503 + Retry-After / RESOURCE_EXHAUSTED at once instead of
    a growing queue."""
    replica_cpus: float = 1.0
    """CPUs reserved per model replica (its torch thread budget)."""
    replica_gpus: float = 0.0
    """GPUs per model replica; > 0 runs the model on the replica's GPU (on a cluster, the autoscaler
    adds a GPU node for it). The same seed gives the same bytes on the same kind of device."""
    api_token_env: str = "AIGC_API_TOKEN"
    """Name of the environment variable (on the Serve nodes) holding the bearer token; unset or empty and no
    api_token_file: no authentication. The token itself never travels in these options."""
    api_token_file: str = ""
    """A file holding the bearer token (e.g. a mounted Kubernetes Secret); read by each ingress replica,
    which fails to start if it is missing or empty (never silently open)."""
    access_log: bool = True
    """Serve's access log line per request (replicas; the proxies follow `app.start`'s). Off saves a log write
    per request and hop (bench/serve_load.py measures both)."""
    max_prompt_chars: int = 4096
    """Longest prompt /v1/complete takes, in characters (422 above it; stated in the OpenAPI)."""
    max_new_tokens: int = 1024
    """Most bytes one /v1/complete request may ask a text model for (422 above it; stated in the OpenAPI)."""
    canaries: dict = dataclasses.field(default_factory=dict)
    """{NAME: PATH_OR_URI}: a candidate served beside model NAME in its own deployment (model-NAME-canary).
    Written by `aigc-ray promote --canary`, which also sets the candidate's share of the traffic (kept in Ray's
    GCS, see serving/canary.py); a candidate listed here without that gets no traffic."""

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("checkpoints: give at least one checkpoint path or URI")
        for key in ("max_num_images", "max_batch_images", "max_body_bytes", "max_image_bytes", "min_replicas",
                    "max_replicas", "max_ongoing_requests", "max_queued_requests", "max_prompt_chars", "max_new_tokens"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < (0 if key == "min_replicas" else 1):
                raise ValueError(f"{key}: must be a positive integer, got {getattr(self, key)!r}")
        if self.max_num_images > HARD_MAX_IMAGES:
            raise ValueError(f"max_num_images: at most {HARD_MAX_IMAGES}")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.replica_gpus < 0:
            raise ValueError(f"replica_gpus: must be >= 0, got {self.replica_gpus!r}")
        if not isinstance(self.access_log, bool):
            raise ValueError(f"access_log: must be true or false, got {self.access_log!r}")
        if not isinstance(self.canaries, dict) or not all(isinstance(v, str) and v for v in self.canaries.values()):
            raise ValueError("canaries: a mapping of served model NAME to a checkpoint path or URI")
        unknown = set(self.canaries) - set(self.models())
        if unknown:
            raise ValueError(f"canaries: {', '.join(sorted(unknown))} is not a served model name "
                             f"(served: {', '.join(self.models())})")
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

def _json_integer(value: Any) -> int:
    """A JSON Schema integer: 3 or 3.0, never true/false or "3" (pydantic's lax int takes both)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                          and not value.is_integer()):
        raise ValueError("must be an integer (not a boolean, string or fraction)")
    return int(value)


JsonInt = Annotated[int, BeforeValidator(_json_integer)]


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="served model name (GET /v1/models); default: the first that "
                                                "can generate")
    num_images: JsonInt = Field(1, ge=1, le=HARD_MAX_IMAGES, description="1..max_num_images")
    # the bounds sit on the integer, not on the Optional: pydantic writes a union's ge/le as
    # non-JSON-Schema keywords, which clients (and schemathesis) ignore
    seed: Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_json_integer)] | None = Field(
        None, description="image i uses seed + i; absent = random")
    labels: list[JsonInt] | None = Field(None, min_length=1, max_length=HARD_MAX_IMAGES,
                                     description="class-conditional models: one label for all, or one per image")
    format: Literal["png", "npy"] = Field("png", description="png: base64 PNG per image; npy: one uint8 NCHW array")
    grid: bool = Field(False, strict=True, description="answer with one PNG grid (image/png) instead of JSON")


class InterpolateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="served model name; default: the first that can generate")
    seed_a: JsonInt = Field(..., ge=0, le=MAX_SEED)
    seed_b: JsonInt = Field(..., ge=0, le=MAX_SEED)
    steps: JsonInt = Field(8, ge=2, le=HARD_MAX_IMAGES, description="2..max_num_images")
    label: Annotated[int, Field(ge=0), BeforeValidator(_json_integer)] | None = Field(
        None, description="class-conditional models only")


class ReconstructBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="served model name; default: the first that can reconstruct")
    images: list[str] = Field(..., min_length=1, max_length=HARD_MAX_IMAGES,
                              description="base64 PNG images: 8-bit, the model's size, grayscale (colour type 0) "
                                          "for 1-channel models, RGB (2) for 3-channel ones")


class ImagesOut(BaseModel):
    model: str
    model_version: str
    seeds: list[int]
    images: list[str] = Field(default_factory=list, description="base64 PNG, tEXt: Model-Version, Seed, AI-Generated")
    npy: str | None = Field(None, description="format=npy: base64 of a .npy uint8 (N, C, H, W) array")


def deployed_openapi(schema: dict, deployed: dict[str, Any]) -> dict:
    """Write the deployment's limits into the generated OpenAPI document (in place).

    deployed: {"max_num_images": int, "generate": [names], "reconstruct": [names], "num_classes": int (the
    most classes of any model that can generate; 0 = none is class-conditional)}.
    """
    bodies = schema.get("components", {}).get("schemas", {})
    limit = deployed["max_num_images"]
    for body, field in (("GenerateBody", "num_images"), ("InterpolateBody", "steps")):
        if body in bodies:
            bodies[body]["properties"][field]["maximum"] = limit
    for body, op in (("GenerateBody", "generate"), ("InterpolateBody", "generate"), ("ReconstructBody", "reconstruct")):
        if body in bodies and deployed[op]:
            prop = bodies[body]["properties"]["model"]
            prop["anyOf"] = [{"type": "string", "enum": list(deployed[op])}, {"type": "null"}]
    if "ReconstructBody" in bodies:
        bodies["ReconstructBody"]["properties"]["images"]["maxItems"] = limit
    classes = deployed["num_classes"]
    for body, field in (("GenerateBody", "labels"), ("InterpolateBody", "label")):
        props = bodies.get(body, {}).get("properties", {})
        if field not in props:
            continue
        if not classes:  # no served model is class-conditional: a label is never accepted
            del props[field]
            continue
        item = {"type": "integer", "minimum": 0, "maximum": classes - 1}
        if field == "labels":
            props[field]["anyOf"] = [{"type": "array", "items": item, "minItems": 1, "maxItems": limit}, {"type": "null"}]
            bodies[body]["oneOf"] = labels_match_num_images(limit)
        else:
            props[field]["anyOf"] = [item, {"type": "null"}]
    if not deployed["reconstruct"]:  # no served model has an encoder: the operation is not offered (404)
        schema.get("paths", {}).pop("/v1/reconstruct", None)
        bodies.pop("ReconstructBody", None)
    return schema


def labels_match_num_images(limit: int) -> list[dict]:
    """`labels` is one label for all images or one per image: none or 1 item, or exactly num_images items.
    JSON Schema has no "equals another field", so one alternative per count n (2..limit), exclusive of
    each other: a oneOf (schemathesis's canonicaliser gives up on an anyOf or if/then this long)."""
    return [{"properties": {"labels": {"anyOf": [{"type": "array", "maxItems": 1}, {"type": "null"}]}}}] + [
        {"properties": {"num_images": {"const": n}, "labels": {"type": "array", "minItems": n, "maxItems": n}},
         "required": ["num_images", "labels"]} for n in range(2, limit + 1)]


RUNTIME: dict[str, Any] = {}
"""Per ingress replica (one process each): the resolved token, body limit and rejection counter, set in
Ingress.__init__ and read by the HTTP middleware."""
