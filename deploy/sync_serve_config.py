"""Copy serve/config.yaml into deploy/rayservice.yaml's serveConfigV2, so the RayService serves
exactly what `serve deploy serve/config.yaml` serves. One line differs: the proxies bind the pod's
address (http_options.host 0.0.0.0) instead of 127.0.0.1, or KubeRay's ClusterIP serve service and
its health checks could not reach them; the pod network is still not public.

    python deploy/sync_serve_config.py          # rewrite the manifest
    python deploy/sync_serve_config.py --check  # exit 1 if they differ (CI)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
MANIFEST = ROOT / "deploy" / "rayservice.yaml"
KEY = "  serveConfigV2: |\n"
INDENT = "    "


POD_HOST = "0.0.0.0"


def for_pods(serve_config: str) -> str:
    """serve/config.yaml's text with http_options.host set to the pod's address (comments kept)."""
    lines, in_http, done = serve_config.splitlines(keepends=True), False, False
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith((" ", "#")):
            in_http = line.startswith("http_options:")
        elif in_http and line.lstrip().startswith("host:"):
            indent = line[: len(line) - len(line.lstrip())]
            lines[i] = f"{indent}host: {POD_HOST}  # the pod's address; reached only through ClusterIP services\n"
            done = True
    if not done:
        raise ValueError(f"{SERVE_CONFIG} has no http_options.host line")
    return "".join(lines)


def synced(manifest: str, serve_config: str) -> str:
    """The manifest text with serveConfigV2's block replaced by ``serve_config``."""
    head, sep, rest = manifest.partition(KEY)
    if not sep:
        raise ValueError(f"{MANIFEST} has no line {KEY.strip()!r}")
    lines = rest.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if line.strip() and not line.startswith(INDENT)), len(lines))
    block = "".join(INDENT + line if line.strip() else "\n" for line in serve_config.rstrip("\n").splitlines(True))
    return head + KEY + block.rstrip("\n") + "\n" + "".join(lines[end:])


def main(argv: list[str]) -> int:
    current = MANIFEST.read_text()
    wanted = synced(current, for_pods(SERVE_CONFIG.read_text()))
    if "--check" in argv:
        if wanted != current:
            print(f"{MANIFEST.relative_to(ROOT)} is out of date: run python deploy/sync_serve_config.py",
                  file=sys.stderr)
            return 1
        return 0
    MANIFEST.write_text(wanted)
    print(f"serveConfigV2 of {MANIFEST.relative_to(ROOT)} <- {SERVE_CONFIG.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
