// HexGen dashboard: polls /api/cluster and draws each pipeline as a row of its stages; the chat box streams
// from /v1/chat/completions (server-sent events). Plain DOM, no dependencies; text goes in via textContent.
"use strict";

const REFRESH_MS = 1500;
const state = { model: null, history: [] };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms` : `${s.toFixed(2)} s`;
}

function fmtNumber(x, digits) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function stageCard(stage) {
  const alive = stage.ranks.length > 0 && stage.ranks.every((r) => r.alive);
  const layers = stage.layers > 0 ? `${stage.layers} layers (${stage.first_layer}–${stage.last_layer})` : "layers ?";
  const ranks = el("ul", { class: "ranks" }, ...stage.ranks.map((r) =>
    el("li", {}, el("span", { class: r.alive ? "dot alive" : "dot", title: r.alive
      ? `heartbeat ${fmtNumber(r.heartbeat_age_s, 1)} s ago` : "no heartbeat" }),
    `rank ${r.rank} · ${r.host} · ${r.device}`)));
  const usage = stage.kv_usage === null || stage.kv_usage === undefined ? 0 : stage.kv_usage;
  const kvText = stage.kv_blocks_total
    ? `KV ${stage.kv_blocks_used ?? "?"} / ${stage.kv_blocks_total} blocks (${(usage * 100).toFixed(0)}%)`
    : "KV –";
  return el("div", { class: alive ? "stage" : "stage dead", "data-stage": stage.stage, "data-tp": stage.tp,
                     "data-layers": stage.layers },
    el("div", { class: "stage-title" }, `Stage ${stage.stage} · `, el("span", { class: "tp" }, `TP ${stage.tp}`)),
    el("div", { class: "layers" }, layers),
    ranks,
    el("div", { class: "bar", title: kvText }, el("div", { style: `width:${(usage * 100).toFixed(1)}%` })),
    el("div", { class: "kv" }, kvText),
    el("div", { class: "step" }, `step ${fmtSeconds(stage.step_time_s)}` +
      (stage.steps !== null && stage.steps !== undefined ? ` · ${stage.steps} steps` : "")));
}

function pipelineRow(p) {
  const stages = el("div", { class: "stages" });
  p.stages.forEach((s, i) => {
    if (i > 0) stages.append(el("span", { class: "arrow" }, "→"));
    stages.append(stageCard(s));
  });
  const head = el("div", { class: "pipeline-head" },
    el("span", { class: "name" }, p.id),
    el("span", { class: `state ${p.state}` }, p.state),
    el("span", { class: "muted" }, p.layout || ""),
    el("span", {}, `running ${p.running ?? "–"} · waiting ${p.waiting ?? "–"} · in flight ${p.in_flight ?? "–"}`),
    el("span", { class: "muted" }, `${p.finished} finished · ${p.generation_tokens} tokens` +
      (p.prefix_cache_hit_rate == null ? "" : ` · prefix cache ${(100 * p.prefix_cache_hit_rate).toFixed(1)}% hit`)));
  return el("div", { class: "pipeline", "data-pipeline": p.id }, head, stages);
}

function render(view) {
  state.model = view.model;
  document.getElementById("model").textContent = view.model;
  document.getElementById("queue-depth").textContent = view.queue_depth;
  const r = view.recent || {};
  document.getElementById("tokens-per-s").textContent = fmtNumber(r.tokens_per_s, 1);
  document.getElementById("ttft-p50").textContent = fmtSeconds(r.ttft_p50_s);
  document.getElementById("ttft-p99").textContent = fmtSeconds(r.ttft_p99_s);
  document.getElementById("dead-letters").textContent = view.dead_letters;
  const box = document.getElementById("pipelines");
  const rows = view.pipelines.length ? view.pipelines.map(pipelineRow)
    : [el("p", { class: "muted" }, "No pipeline has registered yet.")];
  box.replaceChildren(...rows);
  document.getElementById("status").textContent =
    `updated ${new Date(view.time * 1000).toLocaleTimeString()}`;
}

async function refresh() {
  try {
    const resp = await fetch("api/cluster", { cache: "no-store" });
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error ? body.error.message : `HTTP ${resp.status}`);
    render(body);
  } catch (e) {
    document.getElementById("status").textContent = `cannot refresh: ${e.message}`;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

function addMessage(role, text) {
  const node = el("div", { class: `msg ${role}` }, text);
  const t = document.getElementById("transcript");
  t.append(node);
  t.scrollTop = t.scrollHeight;
  return node;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return body.error ? body.error.message : `HTTP ${resp.status}`;
  } catch (e) {
    return `HTTP ${resp.status}`;
  }
}

async function send(event) {
  event.preventDefault();
  const input = document.getElementById("chat-input");
  const text = input.value.trim();
  if (!text) return;
  const button = document.getElementById("send");
  button.disabled = true;
  input.value = "";
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const answer = addMessage("assistant", "");
  answer.classList.add("streaming");
  const headers = { "Content-Type": "application/json" };
  const key = document.getElementById("api-key").value;
  if (key) headers.Authorization = `Bearer ${key}`;
  const body = {
    model: state.model, messages: state.history, stream: true,
    max_tokens: Number(document.getElementById("max-tokens").value) || 64,
    temperature: Number(document.getElementById("temperature").value) || 0,
  };
  let content = "";
  try {
    const resp = await fetch("v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    while (!done) {
      const part = await reader.read();
      if (part.done) break;
      buffer += decoder.decode(part.value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices || []) {
            const delta = choice.delta && choice.delta.content;
            if (delta) { content += delta; answer.textContent = content; }
          }
        }
      }
    }
    state.history.push({ role: "assistant", content });
    answer.classList.remove("streaming");
    answer.classList.add("done");
  } catch (e) {
    answer.remove();
    state.history.pop();
    addMessage("error", `error: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

document.getElementById("chat-form").addEventListener("submit", send);
document.getElementById("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); document.getElementById("chat-form").requestSubmit(); }
});
refresh();
