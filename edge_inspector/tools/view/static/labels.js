/* Labelling archived parts (view --archive DIR): list, one part large, Good / Defect (type, box), Undo.
 * Separate from view.js: the live tiles never wait on this, and this never touches their state.
 * Every write goes to POST /api/labels with the operator key view.js keeps in sessionStorage. */
"use strict";
(function () {
  const root = document.getElementById("labelling");
  if (!root) return;
  const $ = (sel) => root.querySelector(sel);
  const KEY = "edge-inspector-key";
  let state = "waiting", entries = [], current = null, box = null, drag = null, auth = "none";

  const fmt = (v) => (v === null || v === undefined) ? "–" : Number(v).toPrecision(3);
  const labelText = (l) => !l ? "waiting" : l.label === "good" ? "good" : `defect${l.defect_type ? ": " + l.defect_type : ""}`;

  async function load() {
    let reply;
    try {
      const response = await fetch(`/api/archive?state=${state}`);
      if (response.status === 404) { root.hidden = true; return; }  // no --archive: no labelling
      reply = await response.json();
    } catch (e) { $(".label-message").textContent = `archive not reachable: ${e.message}`; return; }
    root.hidden = false;
    $(".label-counts").textContent = `${reply.waiting} waiting · ${reply.labelled} labelled · ${reply.total} archived`;
    const select = $(".defect-type");
    if (select.options.length <= 1) {
      for (const kind of reply.defect_types) select.appendChild(new Option(kind, kind));
    }
    entries = reply.entries;
    renderList();
    if (current) current = entries.find((e) => e.stem === current.stem) || current;
  }

  function renderList() {
    const list = $(".label-list");
    list.textContent = "";
    for (const entry of entries) {
      const item = document.createElement("button");
      item.type = "button";
      item.className = `label-item verdict-${entry.verdict}` + (current && current.stem === entry.stem ? " chosen" : "");
      item.dataset.stem = entry.stem;
      const img = document.createElement("img");
      img.loading = "lazy"; img.alt = entry.stem;
      img.src = `/archive/${encodeURIComponent(entry.stem)}/frame`;
      const text = document.createElement("span");
      text.textContent = `${entry.verdict} ${fmt(entry.score)} · ${labelText(entry.label)}`;
      item.append(img, text);
      item.addEventListener("click", () => choose(entry));
      list.appendChild(item);
    }
    $(".label-empty").hidden = entries.length > 0;
  }

  function choose(entry) {  // another part: its own box (if labelled with one); the same part: keep the drawn one
    if (!current || current.stem !== entry.stem) box = (entry.label && entry.label.box) || null;
    current = entry;
    $(".label-detail").hidden = false;
    $(".label-picture").src = `/archive/${encodeURIComponent(entry.stem)}/frame`;
    showHeat();
    $(".label-title").textContent = `${entry.camera_id || ""} #${entry.sequence ?? "?"} · ${entry.verdict} · score ${fmt(entry.score)} ` +
      `(threshold ${fmt(entry.threshold)}) · kept by ${entry.archived || "verdict"} · ${labelText(entry.label)}`;
    $(".undo").disabled = !entry.label;
    drawBox();
    renderList();
  }

  function showHeat() {
    const heat = $(".label-heat"), wanted = $(".show-heat").checked && current && current.has_heatmap;
    heat.hidden = !wanted;
    if (wanted) heat.src = `/archive/${encodeURIComponent(current.stem)}/heatmap`;
  }

  function frameXY(event) {  // pointer position in frame pixels
    const pic = $(".label-picture"), rect = pic.getBoundingClientRect();
    const w = current.width || pic.naturalWidth, h = current.height || pic.naturalHeight;
    return [Math.max(0, Math.min(w, Math.round((event.clientX - rect.left) * w / rect.width))),
            Math.max(0, Math.min(h, Math.round((event.clientY - rect.top) * h / rect.height)))];
  }

  function drawBox() {
    const svg = $(".label-box"), pic = $(".label-picture");
    const w = (current && current.width) || pic.naturalWidth || 4, h = (current && current.height) || pic.naturalHeight || 3;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    const rect = svg.querySelector("rect");
    rect.toggleAttribute("hidden", !box);  // an SVG element has no .hidden property
    if (box) { rect.setAttribute("x", box[0]); rect.setAttribute("y", box[1]); rect.setAttribute("width", box[2]); rect.setAttribute("height", box[3]); }
    $(".box-text").textContent = box ? `box ${box.join(", ")}` : "drag on the picture to mark the defect (optional)";
  }

  async function send(body) {
    const headers = { "Content-Type": "application/json" };
    const key = $(".label-key").value || sessionStorage.getItem(KEY);
    if (key) { headers.Authorization = `Bearer ${key}`; sessionStorage.setItem(KEY, key); }
    const message = $(".label-message");
    message.textContent = "saving…"; message.className = "label-message";
    let reply;
    try {
      const response = await fetch("/api/labels", { method: "POST", headers, body: JSON.stringify(body) });
      reply = await response.json();
    } catch (e) { reply = { ok: false, error: e.message }; }
    message.textContent = reply.ok ? `saved: ${current.stem} is ${labelText(reply.label)}` : `not saved: ${reply.error}`;
    message.className = `label-message ${reply.ok ? "good" : "bad"}`;
    if (reply.ok) { current.label = reply.label; choose(current); await load(); }
  }

  $(".mark-good").addEventListener("click", () => current && send({ stem: current.stem, label: "good" }));
  $(".mark-defect").addEventListener("click", () => current && send({
    stem: current.stem, label: "defect", defect_type: $(".defect-type").value || null, box }));
  $(".undo").addEventListener("click", () => current && send({ stem: current.stem, undo: true }));
  $(".clear-box").addEventListener("click", () => { box = null; drawBox(); });
  $(".show-heat").addEventListener("change", showHeat);
  for (const button of root.querySelectorAll(".label-filter button")) {
    button.addEventListener("click", () => {
      state = button.dataset.state;
      for (const b of root.querySelectorAll(".label-filter button")) b.classList.toggle("active", b === button);
      load();
    });
  }
  const surface = $(".label-frame");
  surface.addEventListener("pointerdown", (e) => { if (current) { drag = frameXY(e); e.preventDefault(); } });
  surface.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const [x, y] = frameXY(e);
    box = [Math.min(x, drag[0]), Math.min(y, drag[1]), Math.abs(x - drag[0]), Math.abs(y - drag[1])];
    drawBox();
  });
  window.addEventListener("pointerup", () => {
    if (drag && box && (box[2] < 2 || box[3] < 2)) box = null;  // a click, not a box
    drag = null; drawBox();
  });
  $(".label-picture").addEventListener("load", drawBox);
  fetch("/api/state").then((r) => r.json()).then((s) => {
    auth = ((s.control || {}).auth) || "none";
    $(".label-key-row").hidden = auth !== "token";
  }).catch(() => {});
  load();
  setInterval(load, 10000);  // new parts arrive while the operator works
})();
