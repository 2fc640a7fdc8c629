// The moa playground: chat over the server's OpenAI API, show which expert answered and what
// every layer's router thought of the prompt. Plain browser JavaScript, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "moa-api-key";

const state = {
  domains: [],      // expert names, in the order of the routers' outputs
  history: [],      // the conversation sent with each prompt: [{role, content}]
  key: sessionStorage.getItem(KEY_STORE) || "",
  busy: false,
};

// ------------------------------------------------------------------ the API

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function apiError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new APIError(response.status, message);
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    showKeyForm(state.key ? "That key was refused; enter the server's API key." : null);
    setStatus("Enter the API key to start.");
    return false;
  }
  if (!response.ok) throw await apiError(response);
  const ids = (await response.json()).data.map((m) => m.id);
  state.domains = ids.filter((id) => id.startsWith("moa:")).map((id) => id.slice(4));
  const force = $("force");
  for (const option of [...force.options]) if (!["auto", "base"].includes(option.value)) option.remove();
  for (const d of state.domains) force.add(new Option(d, d));
  $("key-form").hidden = !state.key;  // keep it visible to change a key that works
  setStatus(`Experts: ${state.domains.join(", ")}`);
  return true;
}

// The model id for a choice of the `force` selector.
function modelFor(choice) {
  if (choice === "auto") return "moa";
  if (choice === "base") return "base";
  return `moa:${choice}`;
}

// POST a streamed chat completion; calls onChunk(chunk) for every server-sent event.
// layerProbs: ask for the routers' per-layer probabilities (a forced answer pays a routing pass).
async function streamChat(model, messages, layerProbs, onChunk) {
  const body = {
    model, messages, stream: true,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Math.round(Number($("max-tokens").value)),
  };
  if (layerProbs) body.moa = { return_layer_probs: true };
  const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw await apiError(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onChunk(JSON.parse(data));
      }
    }
  }
}

// ------------------------------------------------------------------ the chat

function setStatus(text) {
  $("status").textContent = text;
}

function showKeyForm(message) {
  $("key-form").hidden = false;
  if (message) setStatus(message);
  $("api-key").focus();
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  document.body.dataset.state = busy ? "streaming" : "idle";
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// One answer card: the badge (expert), the routing mode and the streamed text.
function answerCard(title, primary) {
  const card = el("div", "card");
  const meta = el("div", "meta");
  meta.append(el("span", "title", title));
  const badge = el("span", "badge pending", "…");
  const routing = el("span", "routing");
  meta.append(badge, routing);
  const text = el("div", "text");
  card.append(meta, text);
  const suffix = primary ? "" : "-compare";
  badge.id = `expert${suffix}`;
  text.id = `answer${suffix}`;
  return { card, badge, routing, text };
}

const ROUTING_LABEL = {
  vote: "routed: vote of the layer routers",
  explicit: "forced expert",
  base: "base model, no expert",
};

function showMoa(view, moa, isPrimary) {
  view.badge.classList.remove("pending");
  view.badge.textContent = moa.fallback ? "base (fallback)" : moa.domain === null ? "base" : moa.domain;
  view.badge.classList.toggle("base", moa.domain === null);
  // routed, yet no expert: the prompt lies far from every domain (the checkpoint's fallback)
  view.routing.textContent = moa.fallback ? "routed: out of domain, answered by the base model"
    : ROUTING_LABEL[moa.routing] || moa.routing;
  if (isPrimary && moa.layer_probs) drawRouters(moa);
}

async function runAnswer(view, model, messages, isPrimary) {
  let text = "";
  let seenMoa = false;
  try {
    await streamChat(model, messages, isPrimary, (chunk) => {
      if (chunk.moa && !seenMoa) {
        seenMoa = true;
        showMoa(view, chunk.moa, isPrimary);
      }
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        text += choice.delta.content;
        view.text.textContent = text;
      }
      if (choice && choice.finish_reason === "length") view.card.classList.add("truncated");
    });
    if (!text) view.text.append(el("em", "muted", "(empty answer)"));
    return text;
  } catch (error) {
    view.card.classList.add("error");
    view.badge.classList.remove("pending");
    view.badge.textContent = "error";
    view.text.textContent = error.message;
    if (error.status === 401) showKeyForm("The server refused the API key.");
    return null;
  }
}

async function send() {
  const prompt = $("prompt").value;
  if (state.busy || !prompt.trim()) return;
  setBusy(true);
  const log = $("log");
  log.querySelector(".empty")?.remove();
  // The fixed ids name the newest answer.
  for (const id of ["answer", "expert", "answer-compare", "expert-compare"]) $(id)?.removeAttribute("id");

  const choice = $("force").value;
  const compare = $("compare").checked;
  // Compare: the routers' answer beside the forced one (the base model's when nothing is forced).
  const other = compare ? (choice === "auto" ? "base" : choice) : null;
  const primaryModel = compare ? "moa" : modelFor(choice);
  const history = $("history").checked ? state.history : [];
  const messages = [...history, { role: "user", content: prompt }];

  const turn = el("div", "turn");
  turn.append(el("div", "user", prompt));
  const answers = el("div", compare ? "answers compare" : "answers");
  const primary = answerCard(compare ? "routed" : "answer", true);
  answers.append(primary.card);
  let secondary = null;
  if (compare) {
    secondary = answerCard(other === "base" ? "base model" : `forced: ${other}`, false);
    answers.append(secondary.card);
  }
  turn.append(answers);
  log.append(turn);
  $("prompt").value = "";
  log.scrollTop = log.scrollHeight;

  try {
    const [text] = await Promise.all([
      runAnswer(primary, primaryModel, messages, true),
      compare ? runAnswer(secondary, modelFor(other), messages, false) : null,
    ]);
    if (text !== null) state.history = [...messages, { role: "assistant", content: text }];
  } finally {
    setBusy(false);
    log.scrollTop = log.scrollHeight;
    $("prompt").focus();
  }
}

// ------------------------------------------------------------------ the routers

function drawRouters(moa) {
  const probs = moa.layer_probs;  // (L, E)
  const domains = state.domains.length === probs[0].length ? state.domains : probs[0].map((_, e) => `expert ${e}`);
  const mean = domains.map((_, e) => probs.reduce((s, row) => s + row[e], 0) / probs.length);
  const top = mean.indexOf(Math.max(...mean));

  const decision = $("decision");
  decision.textContent = "";
  if (moa.fallback) {
    decision.append(`The prompt lies far from every domain: the base model answered (the routers leaned to `
      + `${domains[top]}). `);
  } else if (moa.routing === "vote") {
    decision.append(`The routers chose ${moa.domain} (vote of ${probs.length} layers). `);
  } else {
    decision.append(`Not used for this answer (${moa.routing === "base" ? "base model" : "forced expert"}); `
      + `the routers would have chosen ${domains[top]}. `);
  }
  decision.append(el("span", "muted", "Mean over layers: "
    + domains.map((d, e) => `${d} ${mean[e].toFixed(2)}`).join(", ")));

  const heatmap = $("heatmap");
  heatmap.textContent = "";
  heatmap.style.setProperty("--experts", domains.length);
  const head = el("div", "hm-head");
  head.append(el("span", "hm-label", "layer"));
  domains.forEach((d, e) => head.append(el("span", e === top ? "hm-col chosen" : "hm-col", d)));
  heatmap.append(head);
  probs.forEach((row, layer) => {
    const line = el("div", "hm-row");
    line.dataset.layer = String(layer);
    line.append(el("span", "hm-label", String(layer)));
    const best = row.indexOf(Math.max(...row));
    row.forEach((p, e) => {
      const cell = el("span", e === best ? "hm-cell best" : "hm-cell");
      cell.style.setProperty("--p", p.toFixed(4));
      cell.dataset.p = p.toFixed(4);
      cell.title = `layer ${layer}, ${domains[e]}: ${p.toFixed(3)}`;
      cell.addEventListener("mouseenter", () => { $("heat-readout").textContent = cell.title; });
      line.append(cell);
    });
    heatmap.append(line);
  });
}

// ------------------------------------------------------------------ wiring

function init() {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      send();
    }
  });
  $("new-chat").addEventListener("click", () => {
    state.history = [];
    $("log").replaceChildren(el("p", "empty", "New chat."));
  });
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    await start();
  });
  start();
}

async function start() {
  try {
    await loadModels();
  } catch (error) {
    setStatus(`Cannot reach the server's API: ${error.message}`);
  }
  setBusy(false);
}

init();
