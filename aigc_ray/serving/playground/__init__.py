"""The web playground at `/` of the HTTP app: one HTML page, one script, one style sheet, read from this
package (no CDN, no build step). The page calls the same JSON API as any client (/v1/models, /v1/generate,
/v1/interpolate, /v1/reconstruct) with the token the user types, so it has no rules of its own: the API
decides what is allowed and the page shows its answers, errors included.

The page and its assets hold no secret and are open like /docs (auth.OPEN_PATHS); every call the page makes
needs the token when one is configured. The token stays in a JavaScript variable: never in the URL, storage
or a cookie (a cookie would also make the API answer requests another site triggers).
"""

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE_PATHS = frozenset({"/", *(f"/playground/{name}" for name in ASSETS)})  # open paths, see auth.OPEN_PATHS

# Only this origin's scripts, styles and calls; images from the API's answers (blob: and data: URLs, which
# the page may also read back: blob: URLs can only be made by this origin's own script).
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                      "img-src 'self' blob: data:; connect-src 'self' blob:; form-action 'none'; "
                                      "base-uri 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _asset(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


def add_routes(app: FastAPI) -> None:
    """GET / (the page) and GET /playground/{app.js,style.css}; none of them in the OpenAPI schema."""

    @app.get("/", include_in_schema=False)
    async def playground_page() -> Response:
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)

    def route(name: str, media_type: str):  # a closure per file: the route takes no parameter at all
        async def playground_asset() -> Response:
            return Response(_asset(name), media_type=media_type, headers=HEADERS)
        return playground_asset

    for name, media_type in ASSETS.items():
        app.add_api_route(f"/playground/{name}", route(name, media_type), methods=["GET"], include_in_schema=False)
