"""The chat's one web page: HTML, CSS and plain JavaScript, nothing fetched from the network.

The message being written is a list of parts, images and text, sent in that order: an image added
(upload or paste) joins the list, before the text in the box; "Add text" moves the box's text into
the list, so an image added after it follows it. The reply is read from the NDJSON stream of
``POST /api/chat`` and shown token by token. Element ids used by tests: ``file``, ``text``, ``send``,
``clear``, ``error``, ``transcript`` (each finished reply is a ``.assistant`` with ``data-done``).
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Flamingo chat</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 760px; padding: 12px; color: #222; }
  header { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-bottom: 10px; }
  header h1 { font-size: 20px; margin: 0 12px 0 0; }
  header label { font-size: 13px; }
  input[type=number] { width: 60px; }
  #transcript { border: 1px solid #ccc; border-radius: 8px; min-height: 200px; padding: 10px; }
  .message { margin: 6px 0; padding: 8px 10px; border-radius: 8px; width: fit-content; max-width: 85%;
             white-space: pre-wrap; }
  .user { background: #e4efff; margin-left: auto; }
  .assistant { background: #f1f1f1; }
  .message img, #pending img { height: 64px; image-rendering: pixelated; vertical-align: middle;
                               border-radius: 4px; margin: 2px; }
  #pending { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; margin: 8px 0; min-height: 10px; }
  .chip { border: 1px solid #aac; border-radius: 6px; padding: 2px 4px; background: #f7f9ff; }
  .chip button { border: none; background: none; cursor: pointer; }
  #composer { display: flex; gap: 6px; }
  #text { flex: 1; padding: 6px; font-size: 15px; }
  #error { color: #b00020; min-height: 1.2em; margin-top: 6px; }
</style>
</head>
<body>
<header>
  <h1>Flamingo chat</h1>
  <label>decoding <select id="mode"><option value="greedy">greedy</option>
    <option value="sample">sampling</option></select></label>
  <label>temperature <input id="temperature" type="number" value="0.7" min="0.01" step="0.1"></label>
  <label>top-p <input id="top_p" type="number" value="0.9" min="0.01" max="1" step="0.05"></label>
  <label>max new tokens <input id="max_new_tokens" type="number" value="16" min="1" max="512"></label>
  <button id="clear">Clear</button>
</header>
<div id="transcript"></div>
<div id="pending"></div>
<div id="composer">
  <input id="file" type="file" accept="image/*" multiple title="add images (or paste one)">
  <input id="text" type="text" placeholder="type a message; add or paste images" autocomplete="off">
  <button id="pin" title="put this text before the next image">Add text</button>
  <button id="send">Send</button>
</div>
<div id="error"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const bytes = new Uint8Array(16);
crypto.getRandomValues(bytes);
let session = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
let pending = [];  // the message being written: {type: "image", data, name} | {type: "text", text}
let busy = false;

function showError(message) { $("error").textContent = message || ""; }

function renderPending() {
  const box = $("pending");
  box.replaceChildren();
  pending.forEach((part, index) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    if (part.type === "image") {
      const img = document.createElement("img");
      img.src = part.data;
      img.title = part.name;
      img.alt = part.name;
      chip.append(img);
    } else {
      chip.append(part.text);
    }
    const remove = document.createElement("button");
    remove.textContent = "\u00d7";
    remove.title = "remove";
    remove.onclick = () => { pending.splice(index, 1); renderPending(); };
    chip.append(remove);
    box.append(chip);
  });
}

function addImageFile(file) {
  const reader = new FileReader();
  reader.onload = () => {
    pending.push({ type: "image", data: reader.result, name: file.name || "pasted image" });
    renderPending();
  };
  reader.onerror = () => showError("could not read " + file.name);
  reader.readAsDataURL(file);
}

function pinText() {
  const text = $("text").value.trim();
  if (text) { pending.push({ type: "text", text }); $("text").value = ""; renderPending(); }
}

function addMessage(role, parts) {
  const div = document.createElement("div");
  div.className = "message " + role;
  for (const part of parts) {
    if (part.type === "image") {
      const img = document.createElement("img");
      img.src = part.data;
      img.alt = part.name;
      div.append(img);
    } else {
      div.append(" " + part.text + " ");
    }
  }
  $("transcript").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function settings() {
  const sample = $("mode").value === "sample";
  return {
    max_new_tokens: parseInt($("max_new_tokens").value, 10),
    temperature: sample ? parseFloat($("temperature").value) : 0,
    top_p: sample ? parseFloat($("top_p").value) : null,
  };
}

async function readLines(response, onLine) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (line.trim()) onLine(JSON.parse(line));
    }
  }
}

async function send() {
  if (busy) return;
  pinText();
  if (!pending.length) { showError("type a message or add an image"); return; }
  const parts = pending;
  showError("");
  busy = true;
  $("send").disabled = true;
  const userDiv = addMessage("user", parts);
  const reply = addMessage("assistant", []);
  reply.textContent = "\u2026";
  try {
    const body = { session, settings: settings(),
                   parts: parts.map((p) => p.type === "image" ? { type: "image", data: p.data } : p) };
    const response = await fetch("/api/chat", { method: "POST", body: JSON.stringify(body),
                                                 headers: { "Content-Type": "application/json" } });
    if (!response.ok) {
      let message = "the server answered " + response.status;
      try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
      userDiv.remove();
      reply.remove();
      showError(message);
      return;
    }
    pending = [];
    renderPending();
    reply.textContent = "";
    await readLines(response, (line) => {
      if (line.error) { showError(line.error); }
      else if (line.done) { reply.textContent = line.reply; reply.dataset.done = "true"; }
      else { reply.textContent = line.reply; }
    });
  } catch (error) {
    showError("no answer from the server: " + error);
  } finally {
    busy = false;
    $("send").disabled = false;
  }
}

async function clearConversation() {
  await fetch("/api/clear", { method: "POST", body: JSON.stringify({ session }),
                              headers: { "Content-Type": "application/json" } });
  $("transcript").replaceChildren();
  pending = [];
  renderPending();
  showError("");
}

$("file").addEventListener("change", (event) => {
  for (const file of event.target.files) addImageFile(file);
  event.target.value = "";
});
document.addEventListener("paste", (event) => {
  for (const item of event.clipboardData.items) {
    if (item.kind === "file") { event.preventDefault(); addImageFile(item.getAsFile()); }
  }
});
$("text").addEventListener("keydown", (event) => { if (event.key === "Enter") send(); });
$("send").onclick = send;
$("pin").onclick = pinText;
$("clear").onclick = clearConversation;
fetch("/api/info").then((r) => r.json()).then((info) => {
  if (info.max_images !== null) $("file").title += "; at most " + info.max_images + " per conversation";
});
</script>
</body>
</html>
"""
