"""Optional bearer-token authentication, the same token for HTTP (Authorization header) and gRPC (metadata).

The token comes from a file (a mounted Secret) or an environment variable on the Serve nodes, read by the
ingress replica; it never travels in the application's args, which Serve shows in its dashboard and status.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

TOKEN_ENV = "AIGC_API_TOKEN"
TOKEN_FILE_ENV = "AIGC_API_TOKEN_FILE"
# No secrets there. The playground page and its two files are open too (they ask for the token when the API
# answers 401); serving/playground's PAGE_PATHS lists the same paths.
OPEN_PATHS = frozenset({"/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect",
                        "/", "/playground/app.js", "/playground/style.css"})


def resolve_token(token_env: str = TOKEN_ENV, token_file: str = "") -> str:
    """The configured token, or "" for none. A token file that is named but missing or empty is an error:
    a deployment that was meant to be protected must not come up open."""
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV, "")
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise ValueError(f"api_token_file: {token_file} does not exist")
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"api_token_file: {token_file} is empty")
        return token
    return os.environ.get(token_env, "").strip()


def bearer_ok(expected: str, header: str | None) -> bool:
    """True if no token is configured, or `header` is "Bearer <expected>" (constant-time comparison)."""
    if not expected:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), expected.encode())


def grpc_authorization(metadata) -> str | None:
    """The authorization value of gRPC invocation metadata ((key, value) pairs; keys are lower-case)."""
    for key, value in metadata or ():
        if key == "authorization":
            return value
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
