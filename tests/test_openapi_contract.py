"""The deployed OpenAPI document says exactly what the server accepts (schemathesis `--checks all` found
schema-valid requests the server refused; test_serving runs schemathesis against a live app). The cases it
found are kept here, checked against the document without Ray."""

import copy

import pytest
from jsonschema import Draft202012Validator

from aigc_ray.serving.options import deployed_openapi

LIMIT = 8


def _deployed(reconstruct: list[str], num_classes: int) -> dict:
    from aigc_ray.serving.app import app

    return deployed_openapi(copy.deepcopy(app.openapi()), {"max_num_images": LIMIT, "generate": ["digits"],
                                                            "reconstruct": reconstruct, "num_classes": num_classes})


def _accepts(schema: dict, body: str, request: dict) -> bool:
    return Draft202012Validator(schema["components"]["schemas"][body]).is_valid(request)


@pytest.mark.parametrize("request_, valid", [
    ({"labels": [0] * 63}, False),  # found: num_images left out (1) with 63 labels; the server says 422
    ({"num_images": 3, "labels": [1, 2]}, False),
    ({"num_images": 3, "labels": [1, 2, 3]}, True),  # one per image
    ({"num_images": 3, "labels": [4]}, True),  # one for all
    ({"labels": [4]}, True),
    ({"num_images": 3}, True),
    ({"num_images": 3.0, "labels": [1, 2, 3]}, True),  # 3.0 is the integer 3 in JSON Schema, and to the server
])
def test_labels_are_one_or_one_per_image_in_the_schema(request_, valid):
    assert _accepts(_deployed(["vae"], num_classes=10), "GenerateBody", request_) == valid


def test_reconstruct_is_not_offered_when_no_served_model_has_an_encoder():
    """Found: a schema-valid /v1/reconstruct to an app of GANs got 422; the operation is now left out of the
    document, and the server answers it 404 (test_serving)."""
    schema = _deployed([], num_classes=10)
    assert "/v1/reconstruct" not in schema["paths"] and "/v1/generate" in schema["paths"]
    assert "/v1/reconstruct" in _deployed(["vae"], num_classes=10)["paths"]
