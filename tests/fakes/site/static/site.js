// The fake generator's page: LoRAs kept in localStorage (they outlive a reload, as a real site's
// selection may), a search dialog, a Generate button that streams preview frames and then shows
// the final image in a new <img id="result">.
"use strict";

const $ = (selector) => document.querySelector(selector);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const appliedLoras = () => JSON.parse(localStorage.getItem("fake.loras") || "[]");

function saveLoras(names) {
  localStorage.setItem("fake.loras", JSON.stringify(names));
  renderApplied();
}

function renderApplied() {
  const list = $("#applied-loras");
  list.replaceChildren(...appliedLoras().map((name) => {
    const item = document.createElement("li");
    item.dataset.lora = name;
    const label = document.createElement("span");
    label.textContent = name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove-lora";
    remove.textContent = "Remove";
    remove.addEventListener("click", () => saveLoras(appliedLoras().filter((other) => other !== name)));
    item.append(label, remove);
    return item;
  }));
}

async function searchLoras(query) {
  const results = $("#lora-results");
  results.replaceChildren();
  $(".lora-empty").hidden = true;
  const answer = await fetch(`/api/loras?q=${encodeURIComponent(query)}`);
  const loras = await answer.json();
  await sleep(100); // a search takes a moment, as on a real site
  if (loras.length === 0) {
    $(".lora-empty").hidden = false;
    return;
  }
  results.replaceChildren(...loras.map((lora) => {
    const item = document.createElement("li");
    item.className = "lora-result";
    item.dataset.lora = lora.name;
    item.innerHTML = `<h3></h3><small></small>`;
    item.querySelector("h3").textContent = lora.name;
    item.querySelector("small").textContent = lora.tags.join(", ");
    item.addEventListener("click", () => {
      if (!appliedLoras().includes(lora.name)) saveLoras([...appliedLoras(), lora.name]);
      $("#lora-dialog").close();
    });
    return item;
  }));
}

function toast(message) {
  const note = document.createElement("div");
  note.className = "toast-error";
  note.textContent = message;
  $("#toasts").append(note);
}

async function generate() {
  const button = $("#generate");
  button.disabled = true;
  $("#result")?.remove();
  const preview = $("#preview");
  const progress = $("#progress");
  try {
    const answer = await fetch("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: $("#prompt").value, loras: appliedLoras() }),
    });
    const job = await answer.json();
    if (job.error) {
      toast(job.error);
      return;
    }
    for (let step = 0; step < job.frames; step++) {
      const frame = await (await fetch(`/api/generations/${job.id}/preview/${step}`)).blob();
      const old = preview.src;
      preview.src = URL.createObjectURL(frame);
      preview.hidden = false;
      if (old.startsWith("blob:")) setTimeout(() => URL.revokeObjectURL(old), 1000);
      progress.textContent = `Generating… ${Math.round((100 * (step + 1)) / (job.frames + 1))}%`;
      await sleep(job.frameDelayMs);
    }
    if (job.hang) await new Promise(() => {}); // a generation that never finishes
    let src = `/api/generations/${job.id}/image.png`;
    if (job.finalImage === "data") {
      const blob = await (await fetch(src)).blob();
      src = await new Promise((resolve) => {
        const reader = new FileReader();
        reader.onload = () => resolve(reader.result);
        reader.readAsDataURL(blob);
      });
    }
    const result = document.createElement("img");
    result.id = "result";
    result.alt = "Generated Image";
    result.src = src;
    $("#output").append(result);
    preview.hidden = true;
    progress.textContent = "Done";
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  renderApplied();
  $("#lora-button").addEventListener("click", () => {
    $("#lora-search").value = "";
    $("#lora-results").replaceChildren();
    $(".lora-empty").hidden = true;
    $("#lora-dialog").showModal();
  });
  $("#lora-close").addEventListener("click", () => $("#lora-dialog").close());
  $("#lora-search").addEventListener("keydown", (event) => {
    if (event.key === "Enter") searchLoras(event.target.value);
  });
  $("#generate").addEventListener("click", generate);
  document.body.dataset.ready = "true";
});
