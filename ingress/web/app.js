// The imagebus page: plain JavaScript against the native API under /api, no build step.
"use strict";

(() => {
  const KEY_STORAGE = "imagebus.apiKey";
  const GALLERY_PAGE_SIZE = 12;
  const MAX_RECONNECT_DELAY_MS = 10000;
  const QUIET_CHECK_MS = 4000;
  const TERMINAL = new Set(["completed", "failed", "canceled"]);

  const $ = (id) => document.getElementById(id);
  const state = {
    key: localStorage.getItem(KEY_STORAGE) || "",
    models: {},
    loras: new Map(), // id → {lora, row}
    lorasAvailable: true,
    loraRequest: 0,
    gallery: { page: 1, search: "", model: "", total: 0, hasMore: false, request: 0, live: false },
    clockSkewMs: 0,
    galleryStream: null,
  };

  // --- talking to the API ---------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function headers(extra) {
    return { "X-API-Key": state.key, ...extra };
  }

  async function readPayload(response) {
    const text = await response.text();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch {
      return { message: text.slice(0, 300) };
    }
  }

  async function failure(response) {
    const payload = await readPayload(response);
    const message = payload && typeof payload.message === "string" ? payload.message : `HTTP ${response.status}`;
    return new ApiError(response.status, message);
  }

  function noteServerClock(response) {
    // Countdowns count to the server's expiry time; correct for a client clock that is off.
    const date = Date.parse(response.headers.get("Date") || "");
    if (Number.isNaN(date)) return;
    const skew = date - Date.now();
    state.clockSkewMs = Math.abs(skew) > 2000 ? skew : 0;
  }

  async function api(path, { method = "GET", body, signal } = {}) {
    const init = { method, signal, headers: headers({ Accept: "application/json" }) };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(0, `cannot reach the server (${error.message})`);
    }
    noteServerClock(response);
    if (!response.ok) throw await failure(response);
    return readPayload(response);
  }

  // EventSource cannot send the API key header: read the stream with fetch and parse the frames.
  async function readEventStream(path, { lastEventId, signal, onOpen, onMessage }) {
    const response = await fetch(path, {
      headers: headers(lastEventId ? { Accept: "text/event-stream", "Last-Event-ID": lastEventId } : { Accept: "text/event-stream" }),
      signal,
      cache: "no-store",
    });
    if (!response.ok) throw await failure(response);
    if (onOpen) onOpen();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      // Normalise line ends, but keep a trailing \r: its \n may come in the next chunk.
      const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      buffer = buffer.slice(0, cut).replace(/\r\n?/g, "\n") + buffer.slice(cut);
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = parseFrame(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (frame) onMessage(frame.data, frame.id);
      }
    }
  }

  function parseFrame(block) {
    const data = [];
    let id = null;
    for (const line of block.split("\n")) {
      if (line === "" || line.startsWith(":")) continue; // comments are keep-alives
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
    const text = data.join("\n");
    if (!text.trim()) return null;
    try {
      return { data: JSON.parse(text), id };
    } catch {
      return null;
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // --- small DOM helpers ----------------------------------------------------------------

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    node.append(...children.filter((child) => child !== null && child !== undefined));
    return node;
  }

  function showError(message) {
    $("notice-text").textContent = message;
    $("notice").hidden = false;
  }

  function clearError() {
    $("notice").hidden = true;
  }

  function reportError(error) {
    if (error && error.name === "AbortError") return;
    const message = error instanceof ApiError ? error.message : String((error && error.message) || error);
    showError(message);
    if (error instanceof ApiError && error.status === 401) showKeyForm();
  }

  function debounce(fn, ms) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  // --- expiry countdowns ----------------------------------------------------------------

  function countdownText(expiresAt) {
    const left = Math.floor((Date.parse(expiresAt) - (Date.now() + state.clockSkewMs)) / 1000);
    if (!(left > 0)) return null;
    const minutes = Math.floor(left / 60);
    const seconds = String(left % 60).padStart(2, "0");
    return `Expires in ${minutes}:${seconds}`;
  }

  function tickCountdowns() {
    for (const node of document.querySelectorAll("[data-expires-at]")) {
      const text = countdownText(node.dataset.expiresAt);
      if (text) {
        node.textContent = text;
        continue;
      }
      node.textContent = "Expired";
      const card = node.closest(".image-card");
      if (card && !card.classList.contains("expired")) markExpired(card);
    }
  }

  function markExpired(card) {
    card.classList.add("expired");
    for (const link of card.querySelectorAll("a.download")) {
      link.removeAttribute("href");
      link.setAttribute("aria-disabled", "true");
    }
  }

  // --- images (job results and gallery share one card) -----------------------------------

  function imageCard(image, { caption, onDelete } = {}) {
    const full = image.file_url || image.url || "";
    const thumb = image.thumb_url || full;
    const name = `imagebus-${image.id}.png`;
    const countdown = el("span", { class: "countdown", "data-expires-at": image.expires_at });
    const download = image.file_url
      ? el("a", { class: "button download", href: image.file_url, download: name, text: "Download" })
      : el("a", {
          class: "button download",
          href: image.download_url,
          text: "Download",
          onclick: (event) => {
            event.preventDefault();
            downloadWithKey(image.download_url, name).catch(reportError);
          },
        });
    const meta = [`${image.width}×${image.height}`];
    if (image.seed !== null && image.seed !== undefined) meta.push(`seed ${image.seed}`);
    const card = el(
      "figure",
      { class: "image-card", "data-image-id": image.id },
      el("a", { href: full || undefined, target: "_blank", rel: "noopener", class: "image-link" },
        el("img", { src: thumb, alt: caption || `Image ${image.id}`, loading: "lazy", width: image.width, height: image.height })),
      el("figcaption", {},
        caption ? el("span", { class: "caption", title: caption, text: caption }) : null,
        el("span", { class: "meta", text: meta.join(" · ") }),
        countdown,
        el("span", { class: "image-actions" }, download, onDelete ? deleteButton(onDelete) : null)),
    );
    if (image.expired || !countdownText(image.expires_at)) markExpired(card);
    countdown.textContent = countdownText(image.expires_at) || "Expired";
    return card;
  }

  function deleteButton(onDelete) {
    let armed = null;
    const button = el("button", { type: "button", class: "danger small", text: "Delete" });
    button.addEventListener("click", () => {
      if (!armed) {
        button.textContent = "Confirm delete";
        armed = setTimeout(() => {
          armed = null;
          button.textContent = "Delete";
        }, 4000);
        return;
      }
      clearTimeout(armed);
      button.disabled = true;
      onDelete().catch((error) => {
        button.disabled = false;
        reportError(error);
      });
    });
    return button;
  }

  async function downloadWithKey(url, name) {
    const response = await fetch(url, { headers: headers() });
    if (!response.ok) throw await failure(response);
    const link = el("a", { href: URL.createObjectURL(await response.blob()), download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  // --- API key --------------------------------------------------------------------------

  function showKeyForm() {
    $("key-form").hidden = false;
    $("key-saved").hidden = true;
    $("api-key").focus();
  }

  function showKeySaved() {
    $("key-form").hidden = true;
    $("key-saved").hidden = false;
    $("key-hint").textContent = `…${state.key.slice(-4)}`;
  }

  async function saveKey(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    const previous = state.key;
    state.key = key;
    try {
      await api("/api/jobs?limit=1"); // the key works before it is kept
    } catch (error) {
      state.key = previous;
      reportError(error);
      return;
    }
    localStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    clearError();
    showKeySaved();
    startSignedIn();
  }

  function forgetKey() {
    localStorage.removeItem(KEY_STORAGE);
    state.key = "";
    if (state.galleryStream) state.galleryStream.abort();
    $("gallery-grid").replaceChildren();
    $("gallery-status").textContent = "Enter your API key to see your gallery.";
    showKeyForm();
  }

  // --- models and the form --------------------------------------------------------------

  async function loadModels() {
    const catalog = await api("/api/models");
    state.models = catalog.models || {};
    const select = $("model");
    const filter = $("gallery-model");
    select.replaceChildren();
    filter.replaceChildren(el("option", { value: "", text: "All models" }));
    for (const id of Object.keys(state.models)) {
      select.append(el("option", { value: id, text: id }));
      filter.append(el("option", { value: id, text: id }));
    }
    select.value = catalog.default in state.models ? catalog.default : Object.keys(state.models)[0] || "";
    applyModel();
  }

  function applyModel() {
    const spec = state.models[$("model").value];
    if (!spec) return;
    $("model-description").textContent = spec.description || "";
    const set = (id, value, max) => {
      const input = $(id);
      if (value !== undefined) input.value = value;
      if (max !== undefined) input.max = max;
    };
    set("width", spec.default_width, spec.max_width);
    set("height", spec.default_height, spec.max_height);
    set("steps", spec.default_steps, spec.max_steps);
    set("num-images", Math.min(Number($("num-images").value) || 1, spec.max_images || 8), spec.max_images);
    const negative = spec.supports_negative_prompt !== false;
    $("negative-row").hidden = !negative;
    $("negative-prompt").disabled = !negative;
    const loras = spec.supports_lora !== false && state.lorasAvailable;
    $("lora-fieldset").disabled = !loras;
    $("lora-fieldset").hidden = !state.lorasAvailable;
    $("lora-note").textContent = spec.supports_lora === false ? `${spec.id} takes no LoRAs.` : "";
  }

  function numberField(id) {
    const text = $(id).value.trim();
    return text === "" ? undefined : Number(text);
  }

  function requestBody() {
    const body = {
      prompt: $("prompt").value.trim(),
      model: $("model").value || undefined,
      width: numberField("width"),
      height: numberField("height"),
      num_inference_steps: numberField("steps"),
      num_images: numberField("num-images"),
      seed: numberField("seed"),
    };
    const negative = $("negative-prompt");
    if (!negative.disabled && negative.value.trim()) body.negative_prompt = negative.value.trim();
    if (!$("lora-fieldset").disabled && state.loras.size) {
      body.loras = [...state.loras.values()].map(({ lora, row }) => ({
        id: lora.id,
        weight: Number(row.querySelector(".lora-weight").value),
        trigger_weight: Number(row.querySelector(".lora-trigger-weight").value),
      }));
    }
    for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
    return body;
  }

  async function submitJob(event) {
    event.preventDefault();
    if (!state.key) {
      showError("Enter your API key first.");
      showKeyForm();
      return;
    }
    if (!$("generate-form").reportValidity()) return;
    const body = requestBody();
    const button = $("generate");
    button.disabled = true;
    try {
      const accepted = await api("/api/generate", { method: "POST", body });
      clearError();
      followJob(createJobView(accepted.job_id, body.prompt));
    } catch (error) {
      reportError(error);
    } finally {
      button.disabled = false;
    }
  }

  // --- LoRAs ----------------------------------------------------------------------------

  async function searchLoras() {
    if (!state.key || !state.lorasAvailable) return;
    const query = $("lora-search").value.trim();
    const request = ++state.loraRequest; // answers to superseded searches are dropped
    let result;
    try {
      result = await api(`/api/loras?query=${encodeURIComponent(query)}`);
      if (request !== state.loraRequest) return;
    } catch (error) {
      if (request !== state.loraRequest) return;
      if (error instanceof ApiError && (error.status === 404 || error.status === 405)) {
        state.lorasAvailable = false; // this server has no LoRA catalog
        applyModel();
        return;
      }
      $("lora-status").textContent = error.message;
      return;
    }
    const loras = (result && result.loras) || [];
    const model = $("model").value;
    $("lora-status").textContent = loras.length ? "" : query ? `No LoRA matches “${query}”.` : "No LoRAs installed.";
    $("lora-results").replaceChildren(
      ...loras.slice(0, 20).map((lora) => {
        const applies = !lora.models || lora.models.length === 0 || lora.models.includes(model);
        return el("li", {},
          lora.image ? el("img", { src: lora.image, alt: "", class: "lora-thumb" }) : null,
          el("span", { class: "lora-name", text: lora.name || lora.id }),
          el("span", { class: "hint", text: applies ? (lora.tags || []).join(", ") : `only for ${lora.models.join(", ")}` }),
          el("button", { type: "button", class: "small", text: "Add", disabled: !applies, onclick: () => addLora(lora) }));
      }),
    );
  }

  function addLora(lora) {
    if (state.loras.has(lora.id)) return;
    const weightInput = (cls, label) =>
      el("input", { type: "number", class: cls, min: "-2", max: "2", step: "0.05", value: "1", "aria-label": label });
    const triggers = (lora.trigger_words || []).join(", ");
    const row = el("tr", { "data-lora-id": lora.id },
      el("td", {}, el("span", { text: lora.name || lora.id }), triggers ? el("span", { class: "hint", text: ` (${triggers})` }) : null),
      el("td", {}, weightInput("lora-weight", `Weight of ${lora.name || lora.id}`)),
      el("td", {}, weightInput("lora-trigger-weight", `Trigger weight of ${lora.name || lora.id}`)),
      el("td", {}, el("button", { type: "button", class: "link", text: "Remove", onclick: () => removeLora(lora.id) })));
    state.loras.set(lora.id, { lora, row });
    $("lora-selected").tBodies[0].append(row);
    $("lora-selected").hidden = false;
  }

  function removeLora(id) {
    const entry = state.loras.get(id);
    if (!entry) return;
    entry.row.remove();
    state.loras.delete(id);
    $("lora-selected").hidden = state.loras.size === 0;
  }

  // --- jobs: progress over SSE, results, cancel ------------------------------------------

  function createJobView(jobId, prompt) {
    const card = $("job-template").content.firstElementChild.cloneNode(true);
    card.dataset.jobId = jobId;
    card.querySelector(".job-prompt").textContent = prompt;
    const view = {
      jobId,
      card,
      done: false,
      abort: new AbortController(),
      status: card.querySelector(".job-status"),
      progress: card.querySelector(".progress"),
      bar: card.querySelector(".bar"),
      detail: card.querySelector(".job-detail"),
      preview: card.querySelector(".job-preview"),
      images: card.querySelector(".job-images"),
      cancel: card.querySelector(".job-cancel"),
    };
    view.cancel.addEventListener("click", () => cancelJob(view));
    setJobStatus(view, "pending");
    $("jobs").prepend(card);
    $("jobs-empty").hidden = true;
    return view;
  }

  function setJobStatus(view, status) {
    view.card.dataset.status = status;
    view.status.textContent = status;
    view.status.className = `job-status badge ${status}`;
  }

  function setProgress(view, fraction) {
    const percent = Math.max(0, Math.min(100, Math.round(fraction * 100)));
    view.bar.style.width = `${percent}%`;
    view.progress.setAttribute("aria-valuenow", String(percent));
  }

  async function cancelJob(view) {
    view.cancel.disabled = true;
    try {
      const answer = await api(`/api/jobs/${encodeURIComponent(view.jobId)}/cancel`, { method: "POST" });
      if (!view.done) view.detail.textContent = (answer && answer.message) || "Canceling…";
    } catch (error) {
      view.cancel.disabled = view.done;
      reportError(error);
    }
  }

  async function followJob(view) {
    let lastEventId = null;
    let failures = 0;
    let lastHeard = Date.now();
    // A stream that stays quiet is checked against the job itself, so a terminal state the stream
    // missed (it ended while we were reconnecting) still ends the card.
    const watchdog = setInterval(() => {
      if (view.done || Date.now() - lastHeard < QUIET_CHECK_MS) return;
      lastHeard = Date.now();
      checkJob(view).catch(() => {}); // the stream, or the next check, reports lasting trouble
    }, 1000);
    try {
      while (!view.done) {
        try {
          await readEventStream(`/api/sse/${encodeURIComponent(view.jobId)}`, {
            lastEventId,
            signal: view.abort.signal,
            onMessage: (data, id) => {
              if (id) lastEventId = id;
              failures = 0;
              lastHeard = Date.now();
              onJobMessage(view, data);
            },
          });
        } catch (error) {
          if (error.name === "AbortError") return;
          if (error instanceof ApiError && error.status >= 400 && error.status < 500) {
            view.detail.textContent = error.message;
            reportError(error);
            return;
          }
        }
        if (view.done) return;
        // The stream ended early (a restarted replica): reconnect; the server resends the current state.
        failures += 1;
        view.detail.textContent = "Reconnecting…";
        await sleep(Math.min(500 * 2 ** failures, MAX_RECONNECT_DELAY_MS));
      }
    } finally {
      clearInterval(watchdog);
    }
  }

  async function checkJob(view) {
    const job = await api(`/api/jobs/${encodeURIComponent(view.jobId)}`);
    if (!view.done && job && TERMINAL.has(job.status)) finishJob(view, job);
  }

  function onJobMessage(view, data) {
    switch (data.status) {
      case "pending":
        setJobStatus(view, "pending");
        view.detail.textContent =
          data.position > 0 ? `Queued: ${data.position} job${data.position === 1 ? "" : "s"} ahead` : "Queued: next up";
        return;
      case "processing":
        setJobStatus(view, "processing");
        if (data.total_steps) {
          setProgress(view, data.step / data.total_steps);
          view.detail.textContent = `Step ${data.step} of ${data.total_steps}`;
        }
        if (data.preview) {
          view.preview.src = data.preview;
          view.preview.hidden = false;
        }
        return;
      case "completed":
      case "failed":
      case "canceled":
        finishJob(view, data);
        return;
      default:
        return;
    }
  }

  function finishJob(view, job) {
    view.done = true;
    view.abort.abort();
    setJobStatus(view, job.status);
    view.cancel.hidden = true;
    const images = job.images || [];
    if (job.status === "completed") {
      setProgress(view, 1);
      view.preview.hidden = true;
      view.detail.textContent = `${images.length} image${images.length === 1 ? "" : "s"} · ${job.model || ""}`;
      view.images.replaceChildren(...images.map((image) => imageCard(image)));
      if (!state.gallery.live && state.gallery.page === 1) loadGallery();
    } else if (job.status === "canceled") {
      view.detail.textContent = job.error ? `Canceled: ${job.error}` : "Canceled";
    } else {
      view.detail.textContent = `Failed: ${job.error || "unknown error"}`;
      showError(`Job failed: ${job.error || "unknown error"}`);
    }
  }

  // --- gallery --------------------------------------------------------------------------

  async function loadGallery() {
    if (!state.key) return;
    const gallery = state.gallery;
    const request = ++gallery.request; // answers to superseded searches are dropped
    const query = new URLSearchParams({ page: String(gallery.page), limit: String(GALLERY_PAGE_SIZE) });
    if (gallery.search) query.set("search", gallery.search);
    if (gallery.model) query.set("model", gallery.model);
    $("gallery-status").textContent = "Loading…";
    let result;
    try {
      result = await api(`/api/images?${query}`);
    } catch (error) {
      if (request !== gallery.request) return;
      $("gallery-status").textContent = `Gallery unavailable: ${error.message}`;
      reportError(error);
      return;
    }
    if (request !== gallery.request) return;
    gallery.total = result.total || 0;
    gallery.hasMore = Boolean(result.has_more);
    $("gallery-grid").replaceChildren(...(result.images || []).map(galleryCard));
    renderGalleryState();
  }

  function renderGalleryState() {
    const { page, total, hasMore, search, model } = state.gallery;
    const shown = $("gallery-grid").childElementCount;
    let text;
    if (shown) text = `${total} image${total === 1 ? "" : "s"}`;
    else if (search || model) text = `No images match${search ? ` “${search}”` : ""}${model ? ` in ${model}` : ""}.`;
    else text = page > 1 ? "No more images." : "No images yet: generated images appear here until they expire.";
    $("gallery-status").textContent = text;
    const pages = Math.max(1, Math.ceil(total / GALLERY_PAGE_SIZE));
    $("gallery-page").textContent = `Page ${page} of ${Math.max(pages, page)}`;
    $("gallery-prev").disabled = page <= 1;
    $("gallery-next").disabled = !hasMore;
  }

  function galleryCard(item) {
    return imageCard(item, {
      caption: item.prompt,
      onDelete: async () => {
        await api(`/api/images/${encodeURIComponent(item.id)}`, { method: "DELETE" });
        loadGallery();
      },
    });
  }

  function matchesFilters(item) {
    const { search, model } = state.gallery;
    if (model && item.model_id !== model) return false;
    if (!search) return true;
    const needle = search.toLowerCase();
    return `${item.prompt || ""} ${item.model_id || ""}`.toLowerCase().includes(needle);
  }

  function onGalleryItem(item) {
    if (!item || !item.id || state.gallery.page !== 1 || !matchesFilters(item)) return;
    const grid = $("gallery-grid");
    if (grid.querySelector(`[data-image-id="${CSS.escape(item.id)}"]`)) return;
    grid.prepend(galleryCard(item));
    while (grid.childElementCount > GALLERY_PAGE_SIZE) {
      grid.lastElementChild.remove();
      state.gallery.hasMore = true;
    }
    state.gallery.total += 1;
    renderGalleryState();
  }

  async function followGallery() {
    if (state.galleryStream) state.galleryStream.abort();
    const controller = new AbortController();
    state.galleryStream = controller;
    let failures = 0;
    while (!controller.signal.aborted && state.key) {
      try {
        await readEventStream("/api/sse/gallery", {
          signal: controller.signal,
          onOpen: () => setGalleryLive(true),
          onMessage: (item) => {
            failures = 0;
            onGalleryItem(item);
          },
        });
      } catch (error) {
        if (error.name === "AbortError") return;
        // No live gallery on this server (or a bad key): the page still refreshes after each job.
        if (error instanceof ApiError && error.status >= 400 && error.status < 500) return;
      }
      setGalleryLive(false);
      failures += 1;
      await sleep(Math.min(1000 * 2 ** failures, MAX_RECONNECT_DELAY_MS));
    }
  }

  function setGalleryLive(live) {
    state.gallery.live = live;
    document.body.dataset.galleryLive = String(live); // new images arrive without a reload
  }

  function setGalleryFilters() {
    const search = $("gallery-search").value.trim();
    const model = $("gallery-model").value;
    if (search === state.gallery.search && model === state.gallery.model) return;
    Object.assign(state.gallery, { search, model, page: 1 });
    loadGallery();
  }

  function turnPage(delta) {
    state.gallery.page = Math.max(1, state.gallery.page + delta);
    loadGallery();
  }

  // --- start ----------------------------------------------------------------------------

  // Jobs still running when the page was (re)loaded get their card and stream back.
  async function resumeJobs() {
    let result;
    try {
      result = await api("/api/jobs?limit=10");
    } catch (error) {
      reportError(error);
      return;
    }
    const shown = new Set([...document.querySelectorAll(".job")].map((card) => card.dataset.jobId));
    const running = ((result && result.jobs) || []).filter(
      (job) => (job.status === "pending" || job.status === "processing") && !shown.has(job.id),
    );
    for (const job of running.reverse()) followJob(createJobView(job.id, job.prompt)); // newest ends on top
  }

  function startSignedIn() {
    resumeJobs();
    loadGallery();
    searchLoras();
    followGallery();
  }

  function bind() {
    $("key-form").addEventListener("submit", saveKey);
    $("key-change").addEventListener("click", showKeyForm);
    $("key-forget").addEventListener("click", forgetKey);
    $("notice-close").addEventListener("click", clearError);
    $("model").addEventListener("change", () => {
      applyModel();
      searchLoras(); // which LoRAs apply depends on the model
    });
    $("generate-form").addEventListener("submit", submitJob);
    $("lora-search").addEventListener("input", debounce(searchLoras, 250));
    $("gallery-form").addEventListener("submit", (event) => {
      event.preventDefault();
      setGalleryFilters();
    });
    $("gallery-search").addEventListener("input", debounce(setGalleryFilters, 300));
    $("gallery-model").addEventListener("change", setGalleryFilters);
    $("gallery-prev").addEventListener("click", () => turnPage(-1));
    $("gallery-next").addEventListener("click", () => turnPage(1));
    setInterval(tickCountdowns, 1000);
  }

  async function start() {
    bind();
    if (state.key) showKeySaved();
    else {
      showKeyForm();
      $("gallery-status").textContent = "Enter your API key to see your gallery.";
    }
    try {
      await loadModels();
    } catch (error) {
      reportError(error);
    }
    if (state.key) startSignedIn();
    document.body.dataset.ready = "true"; // for tests and scripts: the first load is done
  }

  start();
})();
