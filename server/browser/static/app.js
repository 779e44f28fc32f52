// The memory browser: banks, a bank's memories page by page, recall with every
// score, delete. Text from the server is set with textContent only, never parsed
// as HTML: memories are whatever an agent stored.
"use strict";

const PAGE = 25;
const state = { bank: null, offset: 0, total: 0, query: null };
const $ = (id) => document.getElementById(id);

function key() { return sessionStorage.getItem("apcm-key") || ""; }

async function api(path, body) {
  const headers = {};
  if (key()) headers["Authorization"] = "Bearer " + key();
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const reply = await fetch("/api/" + path, init);
  const data = await reply.json();
  if (reply.status === 401) $("key-form").hidden = false;
  if (!reply.ok) throw new Error(data.error || reply.statusText);
  return data;
}

function showError(error) {
  $("error").textContent = error ? String(error.message || error) : "";
  $("error").hidden = !error;
}

function cell(row, value, cls) {
  const td = row.insertCell();
  td.textContent = value === undefined || value === null ? "" : String(value);
  if (cls) td.className = cls;
  return td;
}

function metadataText(meta) {
  return Object.entries(meta).map(([k, v]) => k + "=" + v).join(", ");
}

async function loadInfo() {
  const info = await api("info");
  $("health").textContent = info.health;
  $("health").className = "badge " + info.health;
  const m = info.model;
  const facts = [
    ["name", m.name], ["kind", m.kind], ["input", m.input_shape.join(" × ") + " float32"],
    ["code", m.code_dim + " × " + m.code_dtype + " (" + m.bytes_per_code + " B)"],
    ["ratio", m.compression_ratio.toFixed(1) + " : 1 in bytes"], ["device", m.device],
    ["embedder", m.embedder || "none (vectors only)"], ["hash", m.model_hash],
    ["API keys", info.keys ? "required" : "off"],
  ];
  const dl = $("model");
  dl.replaceChildren();
  for (const [name, value] of facts) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dl.append(dt, dd);
  }
  return info;
}

async function loadBanks() {
  const banks = await api("banks");
  const body = $("banks").tBodies[0];
  body.replaceChildren();
  for (const b of banks) {
    const row = body.insertRow();
    row.dataset.bank = b.name;
    if (b.name === state.bank) row.className = "selected";
    cell(row, b.name);
    for (const v of [b.memories, b.capacity]) cell(row, v, "num");
    cell(row, b.policy);
    for (const v of [b.writes, b.evictions, b.reads, b.memory_bytes + b.payload_bytes]) {
      cell(row, v, "num");
    }
    row.addEventListener("click", () => openBank(b.name));
  }
}

function header(names) {
  const row = $("memories").tHead.rows[0];
  row.replaceChildren();
  for (const n of names) {
    const th = document.createElement("th");
    th.textContent = n;
    row.append(th);
  }
}

function parseLabels(text) {
  const labels = {};
  for (const part of text.split(",")) {
    if (!part.trim()) continue;
    const at = part.indexOf("=");
    if (at < 1) throw new Error("write labels as key=value, separated by commas");
    labels[part.slice(0, at).trim()] = part.slice(at + 1).trim();
  }
  return labels;
}

function editButton(cellNode, memory) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "edit";
  button.textContent = "Edit labels";
  button.addEventListener("click", async () => {
    const text = prompt("Labels as key=value, separated by commas (empty: none)",
                        metadataText(memory.metadata));
    if (text === null) return;
    try {
      const done = await api("banks/" + encodeURIComponent(state.bank) + "/metadata",
                             { slot: memory.slot, sequence: memory.sequence,
                               metadata: parseLabels(text) });
      showError(done.updated ? null : "That memory changed since it was shown; nothing edited.");
      await refresh();
    } catch (e) { showError(e); }
  });
  cellNode.append(button);
}

function deleteButton(row, memory) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "delete";
  button.textContent = "Delete";
  button.addEventListener("click", async () => {
    if (!confirm("Delete this memory?\n\n" + memory.text)) return;
    try {
      const done = await api("banks/" + encodeURIComponent(state.bank) + "/delete",
                             { slot: memory.slot, sequence: memory.sequence });
      showError(done.deleted ? null : "That memory changed since it was shown; nothing deleted.");
      await refresh();
    } catch (e) { showError(e); }
  });
  const actions = row.insertCell();
  actions.append(button, " ");
  editButton(actions, memory);
}

async function loadMemories() {
  const bank = encodeURIComponent(state.bank);
  const page = await api(`banks/${bank}/memories?offset=${state.offset}&limit=${PAGE}`);
  state.total = page.total;
  header(["text", "key", "metadata", "slot", "age (sequence)", "accesses", ""]);
  const body = $("memories").tBodies[0];
  body.replaceChildren();
  for (const m of page.memories) {
    const row = body.insertRow();
    cell(row, m.text, "text");
    cell(row, m.key);
    cell(row, metadataText(m.metadata), "meta");
    cell(row, m.slot, "num");
    cell(row, m.sequence, "num");
    cell(row, m.accesses, "num");
    deleteButton(row, m);
  }
  const last = Math.min(state.offset + PAGE, page.total);
  $("summary").textContent = page.total
    ? `${page.total} memories, newest first` : "This bank is empty.";
  $("page").textContent = page.total ? `${state.offset + 1}–${last} of ${page.total}` : "";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = last >= page.total;
  $("pager").hidden = false;
}

async function loadSearch() {
  const bank = encodeURIComponent(state.bank);
  const q = encodeURIComponent(state.query.text);
  const mode = encodeURIComponent(state.query.mode);
  const found = await api(`banks/${bank}/search?q=${q}&mode=${mode}`);
  header(["text", "key", "metadata", "dense (cosine)", "lexical (BM25)", "fused", ""]);
  const body = $("memories").tBodies[0];
  body.replaceChildren();
  for (const h of found.hits) {
    const row = body.insertRow();
    cell(row, h.text, "text");
    cell(row, h.key);
    cell(row, metadataText(h.metadata), "meta");
    for (const v of [h.dense, h.lexical, h.fused]) cell(row, v.toFixed(3), "num");
    deleteButton(row, h);
  }
  $("summary").textContent = `${found.hits.length} hits for “${found.query}” (mode ${found.mode}),`
    + " best first";
  $("pager").hidden = true;
}

async function refresh() {
  await loadBanks();
  if (state.bank) await (state.query ? loadSearch() : loadMemories());
}

async function openBank(name) {
  state.bank = name;
  state.offset = 0;
  state.query = null;
  $("bank").hidden = false;
  $("bank-name").textContent = name;
  $("clear-search").hidden = true;
  $("query").value = "";
  try { await refresh(); showError(null); } catch (e) { showError(e); }
}

async function start() {
  try {
    const info = await loadInfo();
    await loadBanks();
    $("key-form").hidden = !info.keys;  // with keys on, another key can be entered any time
    showError(null);
  } catch (e) { showError(e); }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("apcm-key", $("key").value.trim());
  $("key").value = "";
  start();
});
$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("query").value.trim();
  state.query = text ? { text, mode: $("mode").value } : null;
  $("clear-search").hidden = !state.query;
  try { await refresh(); showError(null); } catch (e) { showError(e); }
});
$("clear-search").addEventListener("click", () => openBank(state.bank));
$("prev").addEventListener("click", async () => {
  state.offset = Math.max(0, state.offset - PAGE);
  try { await loadMemories(); } catch (e) { showError(e); }
});
$("next").addEventListener("click", async () => {
  state.offset += PAGE;
  try { await loadMemories(); } catch (e) { showError(e); }
});
start();
