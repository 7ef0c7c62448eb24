// The classifier page: picks images, sends each to POST classify?cam=true and draws one card per image.
// No framework and no build step. Every URL is relative, so the page also works behind a path prefix.
// Text from the service is only ever set with textContent, never parsed as HTML.
"use strict";

const KEY_STORAGE = "vitae-api-key";
const MODEL_RETRY_MS = 3000;

const page = {
  modelInfo: document.getElementById("model-info"),
  keyForm: document.getElementById("key-form"),
  keyMessage: document.getElementById("key-message"),
  keyInput: document.getElementById("key-input"),
  dropZone: document.getElementById("drop-zone"),
  fileInput: document.getElementById("file-input"),
  chooseButton: document.getElementById("choose-button"),
  clearButton: document.getElementById("clear-button"),
  topK: document.getElementById("top-k"),
  modelLabel: document.getElementById("model-label"),
  modelSelect: document.getElementById("model-select"),
  cards: document.getElementById("cards"),
  template: document.getElementById("card-template"),
};

const cards = new Set();
// Cards waiting for an API key are re-sent once the user gives one.
const waitingForKey = new Set();
let cardCount = 0; // names each card's radio group

// ------------------------------------------------------------------ talking to the service

class ServiceError extends Error {
  constructor(status, detail, retryAfter) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

/** The `detail` of an error body: a string, or FastAPI's list of validation errors. */
function describeDetail(body, fallback) {
  const detail = body && typeof body === "object" ? body.detail : undefined;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((item) => (item && item.msg ? `${(item.loc || []).join(".")}: ${item.msg}` : JSON.stringify(item)))
      .join("; ");
  }
  if (detail !== undefined) return JSON.stringify(detail);
  return fallback;
}

/** fetch with the API key (when one was given); resolves to the JSON body, or throws ServiceError. */
async function callService(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("X-API-Key", key);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (exc) {
    throw new ServiceError(0, `could not reach the service (${exc.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (exc) {
    body = null;
  }
  if (!response.ok) {
    const detail = describeDetail(body, response.statusText || "no detail given");
    throw new ServiceError(response.status, detail, response.headers.get("Retry-After"));
  }
  return body;
}

// ------------------------------------------------------------------ the model line and the API key

/** A short text for one field of /model, whatever its shape (string, number, or an object with a name). */
function describeValue(value) {
  if (value === null || value === undefined || value === "") return null;
  if (typeof value === "string" || typeof value === "number" || typeof value === "boolean") return String(value);
  if (typeof value === "object" && !Array.isArray(value)) {
    if (typeof value.name === "string") return value.name;
    return Object.entries(value)
      .filter(([, v]) => typeof v !== "object")
      .map(([k, v]) => `${k} ${v}`)
      .join(", ") || null;
  }
  return null;
}

function classCount(model) {
  const names = model.class_names;
  if (Array.isArray(names) && names.length > 0) return names.length;
  if (names && typeof names === "object" && Object.keys(names).length > 0) return Object.keys(names).length;
  if (Number.isInteger(model.num_classes) && model.num_classes > 0) return model.num_classes;
  return null;
}

function showModel(model) {
  // Device and precision are read at the top level of /model, or inside a `backend` object when it is one.
  const inner = model.backend && typeof model.backend === "object" ? model.backend : {};
  const name = describeValue(model.name) || "unnamed model";
  const version = describeValue(model.version);
  const backend = describeValue(model.backend);
  const device = describeValue(model.device ?? inner.device);
  const precision = describeValue(model.precision ?? inner.precision);
  const parts = [version ? `${name} (version ${version})` : name];
  if (backend) parts.push(device ? `${backend} on ${device}` : backend);
  else if (device) parts.push(device);
  if (precision) parts.push(precision);
  const classes = classCount(model);
  if (classes) {
    parts.push(`${classes} classes`);
    page.topK.max = String(classes);
    if (Number(page.topK.value) > classes) page.topK.value = String(classes);
  }
  page.modelInfo.textContent = parts.join(" · ");
}

/** The model picked on the page, or "" for the service's default (the picker shows only with several models). */
function chosenModel() {
  return page.modelSelect.hidden ? "" : page.modelSelect.value;
}

/** Fills the model picker from GET /models when the service serves more than one model. */
async function loadModels() {
  let models = [];
  try {
    models = ((await callService("models")) || {}).models || [];
  } catch (error) {
    return; // a service without /models, or one that needs a key first: the default model it is
  }
  if (models.length < 2) return;
  page.modelSelect.replaceChildren(
    ...models.map((model) => {
      const label = model.version ? `${model.name} (version ${model.version})` : model.name;
      const option = new Option(model.state === "ready" ? label : `${label}, ${model.state}`, model.name);
      option.selected = Boolean(model.default);
      return option;
    }),
  );
  page.modelSelect.hidden = page.modelLabel.hidden = false;
}

async function loadModel() {
  try {
    const chosen = chosenModel();
    showModel((await callService(chosen ? `model?${new URLSearchParams({ model: chosen })}` : "model")) || {});
  } catch (error) {
    if (error.status === 401) {
      page.modelInfo.textContent = "Model details need the API key.";
      askForKey(error.detail);
    } else if (error.status === 503) {
      page.modelInfo.textContent = `The model is not ready yet: ${error.detail}. Checking again…`;
      setTimeout(loadModel, MODEL_RETRY_MS);
    } else {
      page.modelInfo.textContent = `Could not read the model details: ${error.detail}`;
    }
  }
}

function askForKey(detail) {
  page.keyMessage.textContent = apiKey()
    ? `The API key was refused (${detail}). Enter the right one.`
    : `This service needs an API key (${detail}).`;
  page.keyForm.hidden = false;
  page.keyInput.focus();
}

page.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = page.keyInput.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  page.keyInput.value = "";
  page.keyForm.hidden = true;
  loadModel();
  const cards = [...waitingForKey];
  waitingForKey.clear();
  for (const card of cards) classify(card);
});

// ------------------------------------------------------------------ one card per image

function topK() {
  const value = Math.round(Number(page.topK.value));
  const max = Number(page.topK.max) || 10;
  return Math.min(Math.max(Number.isFinite(value) ? value : 5, 1), max);
}

function addCard(file) {
  const element = page.template.content.firstElementChild.cloneNode(true);
  cardCount += 1;
  const card = { file, element, camClass: null, request: 0, objectUrl: null };
  const $ = (selector) => element.querySelector(selector);
  card.parts = {
    status: $(".status"),
    error: $(".error"),
    errorText: $(".error-text"),
    retry: $(".retry"),
    stage: $(".stage"),
    original: $(".original"),
    heatmap: $(".heatmap"),
    caption: $(".cam-caption"),
    camLabel: $(".cam-label"),
    viewControls: $(".view-controls"),
    opacity: $(".opacity-input"),
    hint: $(".explain-hint"),
    predictions: $(".predictions"),
    timing: $(".timing"),
  };
  $(".file-name").textContent = file.name || "pasted image";
  element.setAttribute("aria-label", `Image ${file.name || "pasted image"}`);

  // The browser shows the original itself; the heatmap from the service lies over it at the chosen opacity.
  if (file.type.startsWith("image/")) {
    card.objectUrl = URL.createObjectURL(file);
    card.parts.original.src = card.objectUrl;
    card.parts.original.alt = `the uploaded image ${file.name || ""}`.trim();
  } else {
    card.parts.original.hidden = true;
  }
  card.parts.original.addEventListener("load", () => {
    const small = card.parts.original.naturalWidth < 160;
    card.parts.original.classList.toggle("pixelated", small);
    card.parts.heatmap.classList.toggle("pixelated", small);
  });
  card.parts.original.addEventListener("error", () => {
    card.parts.original.hidden = true;
    card.browserCannotShow = true;
  });

  const modeName = `mode-${cardCount}`;
  for (const radio of element.querySelectorAll(".modes input")) {
    radio.name = modeName;
    radio.addEventListener("change", () => setMode(card, radio.value));
  }
  card.parts.opacity.addEventListener("input", () => applyOpacity(card));
  card.parts.retry.addEventListener("click", () => classify(card));
  $(".remove").addEventListener("click", () => removeCard(card));

  page.cards.append(element);
  page.clearButton.disabled = false;
  cards.add(card);
  classify(card);
}

function removeCard(card) {
  cards.delete(card);
  waitingForKey.delete(card);
  if (card.objectUrl) URL.revokeObjectURL(card.objectUrl);
  card.element.remove();
  page.clearButton.disabled = cards.size === 0;
  page.chooseButton.focus();
}

function setMode(card, mode) {
  card.parts.stage.dataset.mode = mode;
  card.parts.opacity.disabled = mode !== "overlay";
}

function applyOpacity(card) {
  card.parts.heatmap.style.opacity = String(Number(card.parts.opacity.value) / 100);
}

function showError(card, error) {
  const { status, detail } = error;
  let message;
  let canRetry = true;
  if (status === 401) {
    message = "The service needs an API key: enter it above and this image is sent again.";
    waitingForKey.add(card);
    askForKey(detail);
    canRetry = false;
  } else if (status === 503) {
    const wait = error.retryAfter ? ` It suggests retrying in ${error.retryAfter} s.` : "";
    message = `The service is busy or not ready (503): ${detail}.${wait}`;
  } else if (status === 504) {
    message = `The service was too slow to answer in time (504): ${detail}. Retry when it is less loaded.`;
  } else if (status === 0) {
    message = `${detail}.`;
  } else {
    message = `The service refused this file (${status}): ${detail}`;
    canRetry = status >= 500;
  }
  card.parts.errorText.textContent = message;
  card.parts.retry.hidden = !canRetry;
  card.parts.error.hidden = false;
  card.parts.status.textContent = "";
}

async function classify(card, camClass = card.camClass) {
  const request = ++card.request; // only the latest answer of a card is drawn
  const params = new URLSearchParams({ cam: "true", top_k: String(topK()) });
  if (camClass !== null && camClass !== undefined) params.set("cam_class", String(camClass));
  if (chosenModel()) params.set("model", chosenModel());
  const form = new FormData();
  form.append("file", card.file, card.file.name || "pasted-image");
  card.element.setAttribute("aria-busy", "true");
  card.parts.error.hidden = true;
  card.parts.status.textContent = camClass === null ? "Classifying…" : "Explaining the chosen class…";
  const started = performance.now();
  try {
    const result = await callService(`classify?${params}`, { method: "POST", body: form });
    if (request !== card.request || !cards.has(card)) return;
    card.camClass = camClass;
    showResult(card, result, performance.now() - started);
  } catch (error) {
    if (request !== card.request || !cards.has(card)) return;
    showError(card, error instanceof ServiceError ? error : new ServiceError(0, String(error)));
  } finally {
    if (request === card.request) card.element.setAttribute("aria-busy", "false");
  }
}

function formatMs(value) {
  return typeof value === "number" ? `${value.toFixed(1)} ms` : null;
}

function showResult(card, result, roundTripMs) {
  const parts = card.parts;
  const predictions = Array.isArray(result.predictions) ? result.predictions : [];
  const cam = result.cam || null;
  const top = predictions[0];
  parts.status.textContent = top ? `Top class: ${top.label} (${(top.score * 100).toFixed(1)} %)` : "No prediction.";
  parts.status.dataset.top1 = top ? top.label : "";

  parts.predictions.replaceChildren(
    ...predictions.map((prediction) => predictionItem(card, prediction, cam ? cam.class_index : null)),
  );
  parts.hint.hidden = !cam || predictions.length < 2;

  if (cam) {
    parts.heatmap.src = `data:image/png;base64,${cam.heatmap_png}`;
    parts.heatmap.alt = `Grad-CAM heatmap for ${cam.label}`;
    parts.heatmap.dataset.classIndex = String(cam.class_index);
    parts.heatmap.hidden = false;
    parts.camLabel.textContent = cam.label;
    parts.caption.hidden = false;
    parts.viewControls.hidden = false;
    if (card.browserCannotShow && cam.overlay_jpeg) {
      // A format the browser cannot draw (TIFF): the service's own blend stands in for the original.
      parts.original.src = `data:image/jpeg;base64,${cam.overlay_jpeg}`;
      parts.original.hidden = false;
      card.browserCannotShow = false;
    }
    applyOpacity(card);
  }

  const timing = result.timing_ms || {};
  const pieces = [
    ["queue", formatMs(timing.queue)],
    ["inference", formatMs(timing.inference)],
    ["service total", formatMs(timing.total)],
    ["round trip", formatMs(roundTripMs)],
  ].filter(([, text]) => text);
  parts.timing.textContent = pieces.map(([name, text]) => `${name} ${text}`).join(" · ");
}

function predictionItem(card, prediction, explained) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "prediction";
  const isExplained = prediction.index === explained;
  button.setAttribute("aria-pressed", String(isExplained));
  const percent = Math.max(0, Math.min(100, prediction.score * 100));
  button.title = isExplained ? "The heatmap explains this class" : `Explain ${prediction.label}`;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = prediction.label;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `${percent.toFixed(1)} %`;
  const bar = document.createElement("span");
  bar.className = "bar";
  bar.setAttribute("aria-hidden", "true");
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = `${percent}%`;
  bar.append(fill);
  button.append(label, score, bar);
  button.addEventListener("click", () => {
    if (!isExplained) classify(card, prediction.index);
  });
  item.append(button);
  return item;
}

// ------------------------------------------------------------------ getting files: picker, drop, paste

function addFiles(fileList) {
  for (const file of fileList) addCard(file);
}

page.chooseButton.addEventListener("click", () => page.fileInput.click());
page.fileInput.addEventListener("change", () => {
  addFiles(page.fileInput.files);
  page.fileInput.value = ""; // choosing the same file again still fires change
});

page.clearButton.addEventListener("click", () => {
  for (const card of [...cards]) removeCard(card);
});

page.topK.addEventListener("change", () => {
  for (const card of cards) classify(card);
});

// Dropping anywhere on the page works; the zone lights up while files are dragged over it.
let dragDepth = 0;
document.addEventListener("dragenter", (event) => {
  if (!event.dataTransfer || ![...event.dataTransfer.types].includes("Files")) return;
  dragDepth += 1;
  page.dropZone.classList.add("dragging");
});
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) page.dropZone.classList.remove("dragging");
});
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  page.dropZone.classList.remove("dragging");
  if (event.dataTransfer && event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
});

document.addEventListener("paste", (event) => {
  if (event.target === page.keyInput) return;
  const files = [...(event.clipboardData ? event.clipboardData.files : [])];
  if (files.length) {
    event.preventDefault();
    addFiles(files);
  }
});

page.modelSelect.addEventListener("change", loadModel);
loadModels().then(loadModel);
