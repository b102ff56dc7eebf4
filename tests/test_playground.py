"""The web playground at `/` (issue 28), driven in headless Chromium through Playwright against a real
`aigc-ray serve` subprocess on 127.0.0.1 (joined to the session's Ray, token required). What a user relies on:
the page asks for the token, the grid it shows is /v1/generate's PNG for the same seed, and what the API refuses
(bad input, a wrong token, overload, a degraded model) is shown as the API's message.

Chromium comes from the system (Debian's `chromium`; .ci/run installs it), found by AIGC_CHROMIUM or on PATH:
Playwright cannot download a browser here. Without one, or without the playwright package, the tests skip."""

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
import torch
from torchvision.io import encode_png

playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                 "(pip install -e '.[dev]')")
CHROMIUM = os.environ.get("AIGC_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p), None)
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no Chromium found (apt-get install chromium, or set "
                                "AIGC_CHROMIUM to a Chromium/Chrome executable)")

TOKEN = "playground-test-token"
WAIT_MS = 60_000  # every wait on the page is bounded: a model call on a busy 2-core machine, with margin
WRONG_TOKEN_MESSAGE = "authorization: missing or wrong bearer token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session, trained_checkpoint, trained_vae_checkpoint, tmp_path_factory):
    """`aigc-ray serve` of a GAN and a VAE, as a user starts it, on the session's Ray (one Ray on the machine)."""
    token_file = tmp_path_factory.mktemp("playground") / "token"
    token_file.write_text(TOKEN + "\n")
    port, grpc_port = _free_port(), _free_port()
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "aigc_ray.cli", "serve", "--checkpoint", f"gan={trained_checkpoint}",
                             "--checkpoint", f"vae={trained_vae_checkpoint}", "--address", address,
                             "--http-port", str(port), "--grpc-port", str(grpc_port), "--max-replicas", "1",
                             "--max-num-images", "16", "--api-token-file", str(token_file), "--no-access-log"],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(240) and proc.poll() is None, "aigc-ray serve did not come up:\n" + "".join(lines[-30:])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          headers={"authorization": f"Bearer {TOKEN}"}) as api:
            yield {"url": f"http://127.0.0.1:{port}", "api": api}
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Serve shuts down, the session's Ray stays
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(base_url=served["url"], viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


def _open(page) -> None:
    """Open the page with no token: the API answers 401 and the page asks for one, the cursor in its field."""
    page.goto("/")
    playwright.expect(page.locator("#auth")).to_be_visible()
    playwright.expect(page.locator("#token")).to_be_focused()


def _sign_in(page, token: str = TOKEN) -> None:
    _open(page)
    page.keyboard.type(token)  # by keyboard alone
    page.keyboard.press("Enter")


def _png(size: int, pad: int = 0) -> bytes:
    img = torch.zeros(1, size, size, dtype=torch.uint8)
    img[:, size // 4:size // 2, size // 4:] = 255
    return encode_png(img).numpy().tobytes() + bytes(pad)


def _blob(page, selector: str) -> bytes:
    """The bytes the page shows in an <img> (a blob: or data: URL), read inside the page."""
    b64 = page.eval_on_selector(selector, """async img => {
        const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let s = ""; bytes.forEach(b => s += String.fromCharCode(b)); return btoa(s); }""")
    return base64.b64decode(b64)


def test_page_asks_for_the_token_and_shows_the_apis_grid_interpolation_and_reconstruction(page, served, tmp_path):
    expect, api = playwright.expect, served["api"]
    assert httpx.get(served["url"] + "/").status_code == 200  # the page itself is open; the API is not
    _sign_in(page)
    expect(page.locator("#model")).to_be_enabled()
    expect(page.locator("#model option")).to_have_text(["gan (dcgan)", "vae (vae)"])
    expect(page.locator("#card tbody th").first).to_have_text("fid (lower is better)")  # the quality card
    expect(page.locator("#auth")).to_be_hidden()

    page.fill("#gen-seed", "5")
    page.fill("#gen-count", "4")
    page.click("#generate-form button")
    expect(page.locator("#grid-figure")).to_be_visible()
    wanted = api.post("/v1/generate", json={"model": "gan", "num_images": 4, "seed": 5, "grid": True})
    assert wanted.status_code == 200 and _blob(page, "#grid") == wanted.content
    version = wanted.headers["x-model-version"]
    assert page.get_attribute("#grid-download", "download") == f"gan-{version[:12]}-seed5-grid-ai-generated.png"
    expect(page.locator("#grid-caption")).to_contain_text("AI-generated")

    page.fill("#int-seed-a", "3")
    page.fill("#int-seed-b", "9")
    page.fill("#int-steps", "5")
    page.click("#interpolate-form button")
    expect(page.locator("#frame-figure")).to_be_visible()
    path = api.post("/v1/interpolate", json={"model": "gan", "seed_a": 3, "seed_b": 9, "steps": 5}).json()["images"]
    page.focus("#frame-slider")
    page.keyboard.press("End")  # the slider, by keyboard: the last frame is seed B's image
    expect(page.locator("#frame-label")).to_have_text("frame 5 of 5 (seed B)")
    assert page.get_attribute("#frame", "src") == "data:image/png;base64," + path[-1]

    page.select_option("#model", "vae")
    upload = _png(8)
    page.set_input_files("#rec-file", files=[{"name": "digit.png", "mimeType": "image/png", "buffer": upload}])
    page.click("#reconstruct-form button")
    expect(page.locator("#rec-figures")).to_be_visible()
    wanted = api.post("/v1/reconstruct", json={"model": "vae", "images": [base64.b64encode(upload).decode()]})
    assert page.get_attribute("#rec-output", "src") == "data:image/png;base64," + wanted.json()["images"][0]
    page.screenshot(path=str(tmp_path / "desktop.png"), full_page=True)  # kept for a look when this fails

    page.set_viewport_size({"width": 390, "height": 844})  # a phone: one column, nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)


def test_a_wrong_token_shows_the_401_message(page, served):
    expect = playwright.expect
    _open(page)
    expect(page.locator("#status")).to_have_text(f"The server needs a valid API token (401): {WRONG_TOKEN_MESSAGE}")
    with page.expect_response("**/v1/models") as answer:
        page.keyboard.type("not-the-token")
        page.keyboard.press("Enter")
    assert answer.value.status == 401 and answer.value.request.headers["authorization"] == "Bearer not-the-token"
    expect(page.locator("#status")).to_have_text(f"The server needs a valid API token (401): {WRONG_TOKEN_MESSAGE}")
    expect(page.locator("#auth")).to_be_visible()
    expect(page.locator("#model")).to_be_disabled()
    assert "not-the-token" not in page.url  # nor kept anywhere but the script's variable
    assert page.evaluate("[document.cookie, localStorage.length, sessionStorage.length]") == ["", 0, 0]


def test_bad_input_and_refused_uploads_show_the_apis_message(page, served):
    expect, api = playwright.expect, served["api"]
    _sign_in(page)
    expect(page.locator("#model")).to_be_enabled()
    page.fill("#gen-count", "999")
    page.click("#generate-form button")
    refused = api.post("/v1/generate", json={"model": "gan", "num_images": 999, "seed": 42, "grid": True})
    assert refused.status_code == 422
    expect(page.locator("#generate-message")).to_have_text(f"The server refused this (422): {refused.json()['error']}")

    page.select_option("#model", "vae")
    for name, upload in (("wrong-size.png", _png(16)), ("too-large.png", _png(8, pad=1_100_000))):
        page.set_input_files("#rec-file", files=[{"name": name, "mimeType": "image/png", "buffer": upload}])
        page.click("#reconstruct-form button")
        refused = api.post("/v1/reconstruct", json={"model": "vae", "images": [base64.b64encode(upload).decode()]})
        assert refused.status_code == 422, refused.text
        expect(page.locator("#reconstruct-message")).to_have_text(
            f"The server refused this (422): {refused.json()['error']}")


def test_a_degraded_conditional_model_and_an_overloaded_server_are_explained(page, served):
    """The API's answers for states a test cannot cheaply cause (a failed swap, a full queue: test_serving causes
    both; a class-conditional model), given to the page in the API's own shape."""
    expect = playwright.expect
    reason = "checkpoint /runs/missing: not found; still serving the last one that loaded"
    sent = []

    def degrade(route):
        answer = route.fetch()
        if answer.status != 200:  # the first call, with no token: the real 401
            return route.fulfill(response=answer)
        body = answer.json()
        body["models"][0].update(degraded=True, last_error=reason, num_classes=3)
        route.fulfill(response=answer, json=body)

    def overloaded(route):
        sent.append(route.request.post_data_json)
        route.fulfill(status=503, headers={"Retry-After": "1"},
                      json={"error": "model: overloaded, its queue is full; retry later"})

    page.route("**/v1/models", degrade)
    page.route("**/v1/generate", overloaded)
    _sign_in(page)
    expect(page.locator("#degraded")).to_have_text(f"This model is degraded: {reason}")
    expect(page.locator("#model option").first).to_have_text("gan (dcgan, degraded)")
    expect(page.locator("#gen-class option")).to_have_count(4)  # by seed, class 0..2
    page.select_option("#gen-class", "2")
    page.click("#generate-form button")
    expect(page.locator("#generate-message")).to_have_text(
        "The server is busy (503): model: overloaded, its queue is full; retry later (Retry-After: 1 s)")
    assert sent == [{"model": "gan", "num_images": 16, "seed": 42, "grid": True, "labels": [2]}]
