// The playground page: calls the served JSON API and shows its answers. No framework, no build step.
"use strict";

// The API token lives in this variable only: never in the URL, localStorage/sessionStorage or a cookie,
// so it is gone on reload and no other page or request can pick it up.
let apiToken = "";
let served = [];  // GET /v1/models's "models"
let objectUrls = {};  // blob: URLs currently shown, per slot, revoked when replaced

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// One call to the API; a non-2xx answer becomes an ApiError carrying the API's own message.
async function call(path, body) {
  const init = { headers: {}, cache: "no-store", credentials: "omit" };
  if (apiToken) init.headers.Authorization = `Bearer ${apiToken}`;
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, "The server did not answer (is it still running?).");
  }
  if (!response.ok) throw new ApiError(response.status, await describeError(response));
  return response;
}

// The API answers errors as {"error": "field: what is wrong"}; Serve's proxy may answer plain text.
async function describeError(response) {
  const text = (await response.text().catch(() => "")).trim();
  let message = text || response.statusText || "no message";
  try {
    const body = JSON.parse(text);
    if (body && body.error !== undefined) {
      message = typeof body.error === "string" ? body.error : JSON.stringify(body.error);
    }
  } catch (err) { /* not JSON: keep the text */ }
  if (response.status === 401) return `The server needs a valid API token (401): ${message}`;
  if (response.status === 503) {
    const retry = response.headers.get("Retry-After");
    return `The server is busy (503): ${message}` + (retry ? ` (Retry-After: ${retry} s)` : "");
  }
  return `The server refused this (${response.status}): ${message}`;
}

function say(element, text, kind = "") {
  element.textContent = text;
  element.className = `message ${kind}`.trim();
}

function fail(element, err) {
  say(element, err.message, "error");
  if (err.status === 401) askForToken();
}

function askForToken() {
  $("auth").hidden = false;
  $("token").focus();
}

// What the user typed, as the API should judge it: "" for an optional field means "not given";
// anything else goes as a number (NaN becomes null in JSON, which the API refuses with a message).
function intField(id, optional = false) {
  const raw = $(id).value.trim();
  if (raw === "" && optional) return undefined;
  return raw === "" ? null : Number(raw);
}

function showBlob(slot, img, blob) {
  if (objectUrls[slot]) URL.revokeObjectURL(objectUrls[slot]);
  objectUrls[slot] = URL.createObjectURL(blob);
  img.src = objectUrls[slot];
  return objectUrls[slot];
}

function fileName(model, version, what) {
  return `${model}-${(version || "").slice(0, 12)}-${what}-ai-generated.png`;
}

function selected() {
  return served.find((m) => m.name === $("model").value);
}

// ---- models -------------------------------------------------------------------------------

async function loadModels() {
  say($("status"), "Loading the served models…");
  try {
    const body = await (await call("/v1/models")).json();
    served = body.models || [];
    const select = $("model");
    select.replaceChildren(...served.map((m) => {
      const option = new Option(`${m.name} (${m.family || "not loaded"}${m.degraded ? ", degraded" : ""})`, m.name);
      option.selected = m.name === body.default;
      return option;
    }));
    select.disabled = served.length === 0;
    $("auth").hidden = true;
    say($("status"), `${served.length} model${served.length === 1 ? "" : "s"} served.`);
    showModel();
  } catch (err) {
    fail($("status"), err);
  }
}

function row(cells) {
  const tr = document.createElement("tr");
  cells.forEach((text, i) => {
    const cell = document.createElement(i === 0 ? "th" : "td");
    if (i === 0) cell.scope = "row";
    cell.textContent = text;
    tr.append(cell);
  });
  return tr;
}

const fmt = (v) => (typeof v === "number" && Number.isFinite(v) ? Number(v.toPrecision(4)).toString() : "–");

function showCard(card) {
  const metrics = (card && card.metrics) || {};
  const names = Object.keys(metrics).filter((k) => !/_(lo|hi)$/.test(k));
  const lower = new Set((card && card.lower_is_better) || []);
  $("card").hidden = names.length === 0;
  $("card-none").hidden = names.length > 0;
  if (!names.length) return;
  const protocol = card.protocol || {};
  $("card-protocol").textContent = "The floor is what real held-out images score, the best a generator can do" +
    (protocol.num_samples ? ` (${protocol.num_samples} samples, seed ${protocol.seed}, ${protocol.dataset}).` : ".");
  let anyInterval = false;
  const rows = names.map((name) => {
    const ratio = card.ratio ? card.ratio[name] : undefined;
    const interval = (card.interval && card.interval[name]) || [metrics[`${name}_lo`], metrics[`${name}_hi`]];
    const known = interval.every((v) => typeof v === "number");
    anyInterval = anyInterval || known;
    return row([lower.has(name) ? `${name} (lower is better)` : name, fmt(metrics[name]),
      fmt(card.floor ? card.floor[name] : undefined), typeof ratio === "number" ? `${fmt(ratio)}x` : "–",
      known ? `${fmt(interval[0])} – ${fmt(interval[1])}` : "–"]);
  });
  $("card").querySelector("tbody").replaceChildren(...rows);
  $("card").classList.toggle("no-interval", !anyInterval);  // no column of dashes before cards carry intervals
}

function showModel() {
  const m = selected();
  if (!m) return;
  // another model's images and messages
  for (const id of ["grid-figure", "frame-figure", "rec-figures"]) $(id).hidden = true;
  for (const id of ["interpolate-message", "reconstruct-message"]) say($(id), "");
  const info = [["family", m.family], ["version", m.version || "none loaded"],
    ["images", m.image_size ? `${m.image_size}x${m.image_size}, ${m.channels} channel${m.channels === 1 ? "" : "s"}` : undefined],
    ["classes", m.num_classes ? String(m.num_classes) : "unconditional"]];
  $("model-info").replaceChildren(...info.filter(([, v]) => v !== undefined).flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    return [dt, dd];
  }));
  const degraded = $("degraded");
  degraded.hidden = !m.degraded;
  degraded.textContent = m.degraded ? `This model is degraded: ${m.last_error || "its requested checkpoint is not the one serving"}` : "";
  showCard(m.card);

  for (const id of ["gen-class", "int-class"]) {
    const options = [new Option(id === "gen-class" ? "by seed (seed + i mod classes)" : "by seed A", "")];
    for (let c = 0; c < (m.num_classes || 0); c++) options.push(new Option(`class ${c}`, String(c)));
    $(id).replaceChildren(...options);
  }
  document.querySelectorAll(".field.conditional").forEach((el) => { el.hidden = !m.num_classes; });
  const generates = m.can_generate !== false;
  for (const form of ["generate-form", "interpolate-form"]) $(form).querySelector("button").disabled = !generates;
  say($("generate-message"), generates ? "" : `${m.name} (${m.family}) does not generate; it only reconstructs.`);
  $("reconstruct-form").hidden = !m.can_reconstruct;
  $("reconstruct-unable").hidden = Boolean(m.can_reconstruct);
}

// ---- the three operations ---------------------------------------------------------------------

async function busy(form, message, work) {
  if (!selected()) {
    say(message, "No model is loaded yet (enter the API token if the page asks for one).", "error");
    return;
  }
  const button = form.querySelector("button");
  button.disabled = true;
  form.setAttribute("aria-busy", "true");
  try {
    await work();
  } catch (err) {
    if (!(err instanceof ApiError)) err = new ApiError(0, `Something went wrong in the page: ${err.message}`);
    fail(message, err);
  } finally {
    button.disabled = false;
    form.removeAttribute("aria-busy");
  }
}

async function generate(event) {
  event.preventDefault();
  const m = selected();
  const message = $("generate-message");
  await busy(event.target, message, async () => {
    const body = { model: m.name, num_images: intField("gen-count"), seed: intField("gen-seed", true), grid: true };
    if (m.num_classes && $("gen-class").value !== "") body.labels = [Number($("gen-class").value)];
    say(message, "Generating…");
    const response = await call("/v1/generate", body);
    const version = response.headers.get("X-Model-Version") || "";
    const seed = response.headers.get("X-Seed");
    const url = showBlob("grid", $("grid"), await response.blob());
    $("grid").alt = `A grid of ${body.num_images} AI-generated images from ${m.name}, seed ${seed}`;
    $("grid-caption").textContent = `AI-generated by ${m.name} (version ${version.slice(0, 12)}), seeds ${seed} to ` +
      `${Number(seed) + body.num_images - 1}`;
    const link = $("grid-download");
    link.href = url;
    link.download = fileName(m.name, version, `seed${seed}-grid`);
    $("grid-figure").hidden = false;
    say(message, "");
  });
}

let frames = [];  // the last interpolation: {url, name}

function showFrame() {
  const i = Number($("frame-slider").value);
  const frame = frames[i];
  if (!frame) return;
  $("frame").src = frame.url;
  $("frame").alt = `Frame ${i + 1} of ${frames.length} of an AI-generated interpolation`;
  $("frame-label").textContent = `frame ${i + 1} of ${frames.length}` + (i === 0 ? " (seed A)" : i === frames.length - 1 ? " (seed B)" : "");
  $("frame-download").href = frame.url;
  $("frame-download").download = frame.name;
}

async function interpolate(event) {
  event.preventDefault();
  const m = selected();
  const message = $("interpolate-message");
  await busy(event.target, message, async () => {
    const body = { model: m.name, seed_a: intField("int-seed-a"), seed_b: intField("int-seed-b"), steps: intField("int-steps") };
    if (m.num_classes && $("int-class").value !== "") body.label = Number($("int-class").value);
    say(message, "Interpolating…");
    const out = await (await call("/v1/interpolate", body)).json();
    frames = out.images.map((b64, i) => ({ url: `data:image/png;base64,${b64}`,
      name: fileName(m.name, out.model_version, `seeds${body.seed_a}-${body.seed_b}-frame${i + 1}`) }));
    const slider = $("frame-slider");
    slider.max = String(frames.length - 1);
    slider.value = "0";
    showFrame();
    $("frame-figure").hidden = false;
    say(message, "");
  });
}

function base64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

async function reconstruct(event) {
  event.preventDefault();
  const m = selected();
  const message = $("reconstruct-message");
  const file = $("rec-file").files[0];
  if (!file) {
    say(message, "Choose a PNG image first.", "error");
    $("rec-file").focus();
    return;
  }
  await busy(event.target, message, async () => {
    say(message, "Reconstructing…");
    const data = base64(new Uint8Array(await file.arrayBuffer()));
    // no checks of our own: the API refuses a wrong size, type or byte count with a message naming it
    const out = await (await call("/v1/reconstruct", { model: m.name, images: [data] })).json();
    showBlob("original", $("rec-original"), file);
    const url = `data:image/png;base64,${out.images[0]}`;
    $("rec-output").src = url;
    $("rec-download").href = url;
    $("rec-download").download = fileName(m.name, out.model_version, "reconstruction");
    $("rec-figures").hidden = false;
    say(message, "");
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiToken = $("token").value.trim();
    $("token").value = "";  // not left in the DOM either
    loadModels();
  });
  $("model").addEventListener("change", showModel);
  $("generate-form").addEventListener("submit", generate);
  $("interpolate-form").addEventListener("submit", interpolate);
  $("frame-slider").addEventListener("input", showFrame);
  $("reconstruct-form").addEventListener("submit", reconstruct);
  loadModels();
});
