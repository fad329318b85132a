// The A/B page: one prompt, baseline and ablated side by side, streamed from POST /v1/ab
// (stream: true). Server-sent events arrive as `start`, `delta` {variant, text},
// `result` {variant, result}, `error` {message} and `done`; fetch() reads them because
// EventSource cannot POST.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "abliserve-api-key";

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadDirections() {
  const response = await fetch("/v1/directions", { headers: authHeaders() });
  if (!response.ok) {
    setStatus(`could not list directions: ${await errorMessage(response)}`, true);
    return;
  }
  const listing = await response.json();
  if (listing.strength_range) {  // the slider offers what the server accepts
    [$("strength").min, $("strength").max] = listing.strength_range;
  }
  const select = $("direction");
  select.querySelectorAll("option[data-loaded]").forEach((option) => option.remove());
  for (const direction of listing.data ?? []) {
    const option = new Option(direction.name, direction.name);
    option.dataset.loaded = "true";
    select.append(option);
  }
  select.dataset.loaded = "true";
}

function resetColumn(index, ablation) {
  const column = $(`variant-${index}`);
  column.dataset.state = "streaming";
  column.querySelector("h2").firstChild.textContent =
    ablation.strength === 0 ? "baseline " : `α = ${ablation.strength} (${ablation.direction}) `;
  const badge = column.querySelector(".badge");
  badge.className = "badge";
  badge.textContent = "";
  column.querySelector(".output").textContent = "";
  column.querySelector(".stats").textContent = "";
}

function escapeRegExp(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

// Wrap every matched marker in <mark class="list">; JailbreakBench markers are case-sensitive,
// heretic's are matched case-insensitively (as abliserve.refusal does).
function highlight(output, text, refusal) {
  // JailbreakBench first, so its (stricter) marks win where both lists match the same text.
  const lists = Object.keys(refusal).sort((a, b) => (b === "jailbreakbench") - (a === "jailbreakbench"));
  const spans = [];  // [start, end, list]
  for (const list of lists) {
    const flags = list === "jailbreakbench" ? "g" : "gi";
    for (const marker of refusal[list].markers.filter((m) => m)) {
      for (const match of text.matchAll(new RegExp(escapeRegExp(marker), flags))) {
        const start = match.index, end = start + match[0].length;
        if (!spans.some(([s, e]) => start < e && end > s)) spans.push([start, end, list]);
      }
    }
  }
  spans.sort((a, b) => a[0] - b[0]);
  output.textContent = "";
  let position = 0;
  for (const [start, end, list] of spans) {
    output.append(text.slice(position, start));
    const mark = document.createElement("mark");
    mark.className = list;
    mark.textContent = text.slice(start, end);
    output.append(mark);
    position = end;
  }
  output.append(text.slice(position));
  if (!text.trim()) output.textContent = "(empty output)";
}

function showResult(index, result) {
  const column = $(`variant-${index}`);
  highlight(column.querySelector(".output"), result.text, result.refusal);
  const refusedBy = Object.entries(result.refusal).filter(([, f]) => f.refused).map(([l]) => l);
  const badge = column.querySelector(".badge");
  badge.className = `badge ${refusedBy.length ? "refused" : "complied"}`;
  badge.textContent = refusedBy.length ? `refused (${refusedBy.join(", ")})` : "complied";
  column.querySelector(".stats").textContent =
    `${result.completion_tokens} tokens · ${result.latency_s.toFixed(2)} s` +
    (result.first_token_s == null ? "" : ` · first token ${result.first_token_s.toFixed(2)} s`) +
    ` · finish: ${result.finish_reason}`;
  column.dataset.state = "done";
}

function handleEvent(event, data) {
  if (event === "start") {
    $("model").textContent = `model: ${data.model}`;
    data.variants.forEach((ablation, index) => resetColumn(index, ablation));
  } else if (event === "delta") {
    $(`variant-${data.variant}`).querySelector(".output").append(data.text);
  } else if (event === "result") {
    showResult(data.variant, data.result);
  } else if (event === "error") {
    throw new Error(data.message);
  }
}

// Split a text/event-stream body into (event, JSON data) pairs as chunks arrive.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let boundary;
    while ((boundary = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(event, JSON.parse(data));
    }
  }
}

async function compare(submit) {
  submit.preventDefault();
  const button = $("run");
  button.disabled = true;
  setStatus("generating…");
  const body = {
    messages: [{ role: "user", content: $("prompt").value }],
    strengths: [Number($("strength").value)],
    max_tokens: Number($("max-tokens").value),
    temperature: 0,
    seed: 0,
    stream: true,
  };
  if ($("system").value.trim()) body.messages.unshift({ role: "system", content: $("system").value });
  if ($("direction").value) body.direction = $("direction").value;
  try {
    const response = await fetch("/v1/ab", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, handleEvent);
    setStatus("done");
  } catch (error) {
    document.querySelectorAll(".column").forEach((c) => { c.dataset.state = "idle"; });
    setStatus(error.message, true);
  } finally {
    button.disabled = false;
  }
}

$("strength").addEventListener("input", (e) => {
  $("strength-value").textContent = Number(e.target.value).toFixed(2);
});
$("api-key").value = localStorage.getItem(KEY_STORAGE) ?? "";
$("api-key").addEventListener("change", (e) => {
  localStorage.setItem(KEY_STORAGE, e.target.value);
  loadDirections();
});
$("controls").addEventListener("submit", compare);
loadDirections();
