/* edge-inspector live view: one EventSource, one tile per camera, pictures fetched by URL.
 * No framework and no build step: this file is served as is. Pictures are fetched one at a time per tile
 * (a newer result replaces a pending one), so a slow link shows fewer frames instead of falling behind. */
"use strict";
(function () {
  const SILENCE_MS = 8000;          // the server pings every 2 s; this long without any event: reconnect
  const REVIEW_MS = 60000;          // a clicked failed part goes back to live after a minute untouched
  const HIST_BINS = 40;
  const tiles = new Map();
  const JET = jetLut();
  let control = { enabled: false, auth: "none" };
  let keepFails = 24, keepScores = 500;
  let source = null, lastEvent = 0, viewUp = false, serviceLink = null;

  const $ = (root, sel) => root.querySelector(sel);
  const fmt = (v, digits) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : Number(v).toFixed(digits);
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  const partTime = (h) => (h.capture_time_iso || "").replace("T", " ").slice(0, 23) || "–";

  function jetLut() {  // the JET colour map the service uses for jpeg_overlay (OpenCV's COLORMAP_JET)
    const lut = new Uint8ClampedArray(256 * 3);
    const c = (v) => Math.max(0, Math.min(1, v)) * 255;
    for (let i = 0; i < 256; i++) {
      const x = i / 255;
      lut[3 * i] = c(1.5 - Math.abs(4 * x - 3));
      lut[3 * i + 1] = c(1.5 - Math.abs(4 * x - 2));
      lut[3 * i + 2] = c(1.5 - Math.abs(4 * x - 1));
    }
    return lut;
  }

  // Over a frame, heat is see-through where it is low and strong where it matters: alpha is 0 up to a third
  // of the threshold (v 40; the threshold is v 127.5 with the default full_scale 2), 0.6 at the threshold,
  // 0.7 past it, so the part stays visible everywhere except under what the model flags.
  const alphaOver = (v) => 0.7 * Math.max(0, Math.min(1, (v - 40) / 100));

  function colorize(ctx, w, h, overFrame) {  // grey PNG heatmap (R=G=B=value) -> JET, in place
    const image = ctx.getImageData(0, 0, w, h), px = image.data;
    for (let i = 0; i < px.length; i += 4) {
      const v = px[i], j = 3 * v;
      px[i] = JET[j]; px[i + 1] = JET[j + 1]; px[i + 2] = JET[j + 2];
      px[i + 3] = overFrame ? Math.round(255 * alphaOver(v)) : 255;
    }
    ctx.putImageData(image, 0, 0);
  }

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error(`picture ${url} not available`));
      img.src = url;
    });
  }

  function pictures(item) {  // [frame or null, heatmap/overlay or null], whichever of them exist
    const get = (url) => url ? loadImage(url).catch(() => null) : Promise.resolve(null);
    return Promise.all([get(item.frame), get(item.image)]);
  }

  // What a canvas shows: the frame with the heatmap over it ("png+frame", the default service settings);
  // the overlay as published ("jpeg_overlay"); the frame alone ("frame": heatmap none or an error); or,
  // from a service that sends no frames, the heatmap alone ("png").
  function compose(canvas, item, frame, heat, height) {
    const header = item.header, format = (header.heatmap || {}).format;
    const base = format === "jpeg_overlay" && heat ? heat : (frame || heat);
    if (!base) return null;
    const w = height ? Math.max(1, Math.round(base.naturalWidth * height / base.naturalHeight)) : base.naturalWidth;
    const h = height || base.naturalHeight;
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(base, 0, 0, w, h);
    let shown = base === frame ? "frame" : format;
    if (format === "png" && heat && base === frame) {
      const layer = document.createElement("canvas");
      layer.width = heat.naturalWidth; layer.height = heat.naturalHeight;
      const lctx = layer.getContext("2d", { willReadFrequently: true });
      lctx.drawImage(heat, 0, 0);
      colorize(lctx, layer.width, layer.height, true);
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(layer, 0, 0, w, h);
      shown = "png+frame";
    } else if (format === "png" && base === heat) {
      colorize(ctx, w, h, false);
    }
    canvas.dataset.format = shown;
    return ctx;
  }

  function svgEl(name, attrs) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    return el;
  }

  function drawBoxes(svg, header) {
    const frame = header.frame || { width: 4, height: 3 };
    svg.setAttribute("viewBox", `0 0 ${frame.width} ${frame.height}`);
    svg.replaceChildren();
    for (const [x, y, w, h] of header.tile_boxes || []) {
      if ((header.tile_boxes || []).length > 1) svg.appendChild(svgEl("rect", { class: "tile-box", x, y, width: w, height: h }));
    }
    const size = Math.max(10, frame.width / 40);
    for (const d of header.defects || []) {
      svg.appendChild(svgEl("rect", { class: "defect-shadow", x: d.x, y: d.y, width: d.width, height: d.height }));
      svg.appendChild(svgEl("rect", { class: "defect-box", x: d.x, y: d.y, width: d.width, height: d.height }));
      const label = svgEl("text", { x: d.x, y: Math.max(size, d.y - 3), fill: "#fff", "font-size": size,
                                    "font-weight": "700", stroke: "#000", "stroke-width": size / 8, "paint-order": "stroke" });
      label.textContent = `${fmt(d.peak, 1)}×`;
      svg.appendChild(label);
    }
  }

  async function postControl(cameraId, action, body) {
    const headers = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem("edge-inspector-key");
    if (control.auth === "token" && key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(`/api/control/${encodeURIComponent(cameraId)}/${action}`,
                                 { method: "POST", headers, body: JSON.stringify(body) });
    let reply;
    try { reply = await response.json(); } catch (e) { reply = { ok: false, error: `HTTP ${response.status}` }; }
    return reply;
  }

  class Tile {
    constructor(cameraId) {
      this.id = cameraId;
      this.el = document.getElementById("tile-template").content.firstElementChild.cloneNode(true);
      this.el.dataset.camera = cameraId;
      $(this.el, ".camera-id").textContent = cameraId;
      this.canvas = $(this.el, "canvas.overlay");
      this.svg = $(this.el, "svg.boxes");
      this.strip = $(this.el, ".fail-strip");
      this.hist = $(this.el, "canvas.histogram");
      this.scores = []; this.fails = []; this.latest = null; this.latestAt = 0; this.health = null;
      this.loading = false; this.pending = null; this.review = null; this.reviewTimer = null;
      this.candidate = null; this.endpoint = "";
      this.wire();
      this.placeholder(this.waiting());
      document.getElementById("tiles").appendChild(this.el);
    }

    wire() {
      $(this.el, ".back-live").addEventListener("click", () => this.endReview());
      $(this.el, "details").addEventListener("toggle", () => { this.drawHistogram(); this.fetchStatus(); });
      const number = $(this.el, ".candidate"), range = $(this.el, ".candidate-range");
      number.addEventListener("input", () => { this.candidate = parseFloat(number.value); this.syncRange(); this.drawHistogram(); });
      range.addEventListener("input", () => {
        this.candidate = Number((this.histMax() * range.value / 1000).toPrecision(4));
        number.value = this.candidate; this.drawHistogram();
      });
      const key = $(this.el, ".key");
      key.value = sessionStorage.getItem("edge-inspector-key") || "";
      key.addEventListener("change", () => sessionStorage.setItem("edge-inspector-key", key.value));
      $(this.el, ".apply").addEventListener("click", () => this.act("threshold", { value: this.candidate },
        (r) => `threshold now ${fmt(r.threshold, 4)} (was ${fmt(r.previous, 4)})`));
      $(this.el, ".reload").addEventListener("click", () => {
        const bundle = $(this.el, ".bundle").value.trim();
        this.act("reload", bundle ? { bundle } : {},
          (r) => `reloaded ${r.model_id} (was ${r.previous}); threshold ${fmt(r.threshold, 4)}`);
      });
    }

    async fetchStatus() {  // what the service allows and runs, shown beside the threshold controls
      if (!control.enabled || !$(this.el, "details").open) return;
      const headers = {};
      const key = sessionStorage.getItem("edge-inspector-key");
      if (control.auth === "token" && key) headers.Authorization = `Bearer ${key}`;
      try {
        const reply = await (await fetch(`/api/control/${encodeURIComponent(this.id)}/status`, { headers })).json();
        if (!reply.ok) return;
        const bits = [`bundle threshold ${fmt(reply.bundle_threshold, 4)}`];
        if (reply.threshold_range) bits.push(`allowed ${fmt(reply.threshold_range[0], 4)} – ${fmt(reply.threshold_range[1], 4)}`);
        if (reply.model) bits.push(`bundle ${reply.model.path}`);
        $(this.el, ".service-status").textContent = bits.join(" · ");
        if (reply.model && !$(this.el, ".bundle").value) $(this.el, ".bundle").placeholder = reply.model.path;
      } catch (err) { /* the service may be restarting; the next opening asks again */ }
    }

    async act(action, body, describe) {
      const message = $(this.el, ".control-message");
      if (action === "threshold" && !(this.candidate > 0)) {
        message.textContent = "enter a threshold above 0"; message.className = "control-message bad"; return;
      }
      const buttons = this.el.querySelectorAll(".control button");
      buttons.forEach((b) => { b.disabled = true; });
      message.textContent = action === "reload" ? "reloading (loads and warms up the bundle)…" : "applying…";
      message.className = "control-message";
      try {
        const reply = await postControl(this.id, action, body);
        message.textContent = reply.ok ? describe(reply) : `refused: ${reply.error}`;
        message.className = `control-message ${reply.ok ? "good" : "bad"}`;
      } catch (err) {
        message.textContent = `failed: ${err.message}`; message.className = "control-message bad";
      } finally {
        buttons.forEach((b) => { b.disabled = false; });
      }
    }

    reset(cam) {
      this.scores = (cam.scores || []).slice(-keepScores);
      this.fails = [];
      this.strip.replaceChildren();
      for (const item of cam.fails || []) this.addFail(item);
      this.setHealth(cam.health, cam.counters);
      this.endpoint = cam.endpoint || this.endpoint;
      if (cam.latest) this.setLatest(cam.latest, cam.counters, false);
      else this.placeholder(this.waiting());
      this.drawHistogram();
    }

    onResult(item, counters) {
      const h = item.header;
      if (h.score !== null && h.score !== undefined) {
        this.scores.push([h.score, h.verdict]);
        if (this.scores.length > keepScores) this.scores.splice(0, this.scores.length - keepScores);
      }
      if (h.verdict === "fail") this.addFail(item);
      this.setLatest(item, counters, true);
      this.drawHistogram();
    }

    setLatest(item, counters, fresh) {
      this.latest = item;
      this.latestAt = Date.now() - (fresh ? 0 : (item.age_s || 0) * 1000);
      const h = item.header;
      const verdict = $(this.el, ".verdict");
      verdict.textContent = String(h.verdict || "?").toUpperCase();
      verdict.className = `verdict verdict-${["pass", "review", "fail", "error"].includes(h.verdict) ? h.verdict : "none"}`;
      $(this.el, ".seq").textContent = `#${h.sequence} · ${partTime(h).slice(11)}`;
      const full = (h.heatmap || {}).full_scale || 2;
      const fill = $(this.el, ".score-fill");
      fill.style.width = `${Math.min(1, (h.normalised_score || 0) / full) * 100}%`;
      fill.classList.toggle("over", (h.normalised_score || 0) > 1);
      $(this.el, ".score-mark").style.left = `${100 / full}%`;
      $(this.el, ".score-text").textContent = h.score === null ? (h.error || "no score")
        : `score ${fmt(h.score, 3)} · threshold ${fmt(h.threshold, 3)} · ${fmt(h.normalised_score, 2)}× threshold`;
      this.setCounters(counters);
      if (!this.review) this.show(item);
      else this.pending = item;
    }

    show(item) {  // one picture load at a time; the newest waiting result wins
      if (this.loading) { this.pending = item; return; }
      this.pending = null;
      this.caption(item);
      drawBoxes(this.svg, item.header);
      this.loading = true;
      this.showing = item;
      pictures(item).then(([frame, heat]) => {
        if (this.showing !== item) return;  // a review click replaced it meanwhile
        if (!compose(this.canvas, item, frame, heat)) {
          this.placeholder(`#${item.header.sequence}: no picture (${item.header.error || "heatmap: none, and no frame"})`);
        } else {
          this.placeholder(null);
          const frameBox = $(this.el, ".frame-box");
          frameBox.style.aspectRatio = `${this.canvas.width} / ${this.canvas.height}`;
        }
        this.canvas.dataset.itemId = item.id;
        this.canvas.dataset.sequence = item.header.sequence;
      }).catch(() => { /* too old by the time we asked: the next result brings a new one */ })
        .finally(() => {
          this.loading = false;
          const next = this.pending;
          if (next && next !== item && (!this.review || next === this.review)) this.show(next);
        });
    }

    waiting() { return `waiting for the first result from ${this.endpoint || endpointsText()}…`; }

    placeholder(text) {  // instead of a black picture: what the tile waits for
      const note = $(this.el, ".placeholder");
      note.toggleAttribute("hidden", text === null);  // svg has no .hidden property: the attribute
      this.canvas.toggleAttribute("hidden", text !== null);
      this.svg.toggleAttribute("hidden", text !== null);
      if (text !== null) note.textContent = text;
    }

    caption(item) {
      const h = item.header, d = h.defects || [];
      const parts = [`#${h.sequence}`, `part time ${partTime(h)}`];
      if (h.source_file) parts.push(String(h.source_file).split("/").pop());
      if (d.length) parts.push(`${plural(d.length, "defect")}, largest ${h.largest_defect_area} px`);
      if (h.error) parts.push(`error: ${h.error}`);
      if (!item.image && !item.frame) parts.push("no picture published (heatmap: none)");
      else if (!item.frame) parts.push("heatmap only: this service sends no frames");
      $(this.el, ".caption").textContent = parts.join(" · ");
    }

    addFail(item) {
      this.fails.unshift(item);
      const button = document.createElement("button");
      button.type = "button"; button.className = "fail-thumb"; button.dataset.itemId = item.id;
      button.title = `fail #${item.header.sequence} ${item.header.capture_time_iso || ""}`;
      const canvas = document.createElement("canvas");
      canvas.height = 64; canvas.width = 80;
      const label = document.createElement("span");
      label.textContent = `#${item.header.sequence}`;
      button.append(canvas, label);
      button.addEventListener("click", () => this.startReview(item, button));
      this.strip.prepend(button);
      while (this.fails.length > keepFails) {
        this.fails.pop();
        this.strip.lastElementChild.remove();
      }
      $(this.el, ".strip-count").textContent = `(${this.fails.length})`;
      pictures(item).then(([frame, heat]) => {
        const ctx = compose(canvas, item, frame, heat, 64);
        if (!ctx) return;
        const size = item.header.frame, sx = canvas.width / size.width, sy = canvas.height / size.height;
        ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
        for (const d of item.header.defects || []) ctx.strokeRect(d.x * sx, d.y * sy, d.width * sx, d.height * sy);
      }).catch(() => {});
    }

    startReview(item, button) {
      this.review = item;
      this.strip.querySelectorAll(".selected").forEach((b) => b.classList.remove("selected"));
      button.classList.add("selected");
      const banner = $(this.el, ".review-banner");
      banner.hidden = false;
      $(this.el, ".review-text").textContent =
        `Reviewing fail #${item.header.sequence} · ${(item.header.capture_time_iso || "").slice(11, 19)}`;
      this.loading = false;
      this.show(item);
      clearTimeout(this.reviewTimer);
      this.reviewTimer = setTimeout(() => this.endReview(), REVIEW_MS);
    }

    endReview() {
      clearTimeout(this.reviewTimer);
      this.review = null;
      $(this.el, ".review-banner").hidden = true;
      this.strip.querySelectorAll(".selected").forEach((b) => b.classList.remove("selected"));
      if (this.latest) this.show(this.latest);
    }

    setHealth(health, counters) {
      if (counters) this.setCounters(counters);
      if (!health) return;
      if (!this.latest) this.placeholder(this.waiting());
      this.health = health;
      const badge = $(this.el, ".health");
      const state = health.state || "?";
      badge.textContent = health.ok === false ? `${state} · problem` : state;
      badge.className = `health badge ${health.ok === false || state === "stopped" ? "bad"
        : state === "connected" ? "ok" : "warn"}`;
      const detail = $(this.el, ".health-detail");
      const bits = [];
      if (health.problems && health.problems.length) bits.push(health.problems.join("; "));
      else if (state === "waiting" && health.last_error) bits.push(health.last_error);
      bits.push(`${plural(health.reconnects || 0, "reconnect")}`);
      if (health.uptime_s !== undefined) bits.push(`up ${Math.round(health.uptime_s)} s`);
      if (health.archive) bits.push(`archive ${health.archive.saved} saved, ${fmt(health.archive.megabytes, 0)} MB`);
      detail.textContent = bits.join(" · ");
      detail.classList.toggle("bad", health.ok === false);
      if (health.model) $(this.el, ".model").textContent = health.model.id;
    }

    setCounters(c) {
      if (!c) return;
      const set = (name, text) => { $(this.el, `[data-counter="${name}"]`).textContent = text; };
      set("parts", c.parts); set("fails", c.fails); set("reviews", c.reviews ?? 0); set("errors", c.errors);
      set("dropped", c.dropped ?? "–"); set("fps", fmt(c.fps, 1));
      set("latency_p50", c.latency_p50 == null ? "–" : `${fmt(c.latency_p50, 0)} ms`);
      set("latency_p99", c.latency_p99 == null ? "–" : `${fmt(c.latency_p99, 0)} ms`);
      set("fail_rate", c.parts ? `${fmt(100 * c.fails / c.parts, 1)}%` : "–");
    }

    threshold() {
      if (this.latest && this.latest.header.threshold) return this.latest.header.threshold;
      return this.health ? this.health.threshold : null;
    }

    histMax() {
      let max = 0;
      for (const [s] of this.scores) if (s > max) max = s;
      return Math.max(max, this.threshold() || 0, this.candidate || 0) * 1.1 || 1;
    }

    syncRange() {
      $(this.el, ".candidate-range").value = Math.round(1000 * (this.candidate || 0) / this.histMax());
    }

    drawHistogram() {
      const threshold = this.threshold();
      if (this.candidate === null && threshold) {
        this.candidate = threshold;
        $(this.el, ".candidate").value = threshold;
        this.syncRange();
      }
      const n = this.scores.length, candidate = this.candidate;
      const overNow = threshold ? this.scores.filter(([s]) => s > threshold).length : 0;
      const overCand = candidate > 0 ? this.scores.filter(([s]) => s > candidate).length : 0;
      const pct = (k) => n ? `${fmt(100 * k / n, 1)}%` : "–";
      $(this.el, ".hist-summary").textContent = n ? `(${n} recent, ${overNow} over)` : "";
      $(this.el, ".preview").textContent = !n ? "no scores yet" : (candidate > 0
        ? `With ${fmt(candidate, 4)}: ${overCand} of the last ${n} parts score over it (${pct(overCand)}); now ${overNow} (${pct(overNow)}).`
        : "enter a candidate threshold");
      if (!$(this.el, "details").open) return;  // drawing only when someone looks
      const ctx = this.hist.getContext("2d"), W = this.hist.width, H = this.hist.height;
      ctx.clearRect(0, 0, W, H);
      if (!n) return;
      const max = this.histMax(), bins = new Array(HIST_BINS).fill(0);
      for (const [s] of this.scores) bins[Math.min(HIST_BINS - 1, Math.floor(s / max * HIST_BINS))]++;
      const top = Math.max(...bins), bw = W / HIST_BINS;
      bins.forEach((count, i) => {
        const centre = (i + 0.5) * max / HIST_BINS, bh = count ? Math.max(2, (H - 14) * count / top) : 0;
        ctx.fillStyle = candidate > 0 && centre > candidate ? "#e0323c" : "#2fa84f";
        ctx.fillRect(i * bw + 1, H - bh, bw - 2, bh);
      });
      const line = (value, dash, colour) => {
        if (!(value > 0)) return;
        const x = Math.round(W * value / max) + 0.5;
        ctx.setLineDash(dash); ctx.strokeStyle = colour; ctx.lineWidth = 2;
        ctx.beginPath(); ctx.moveTo(x, 0); ctx.lineTo(x, H); ctx.stroke(); ctx.setLineDash([]);
      };
      line(threshold, [], "#ffffff");
      line(candidate, [5, 4], "#ffd866");
      ctx.fillStyle = "#8a94a3"; ctx.font = "10px sans-serif";
      ctx.fillText("0", 2, 10); ctx.fillText(fmt(max, 2), W - 40, 10);
    }

    tick(now) {
      if (!this.latest) return;
      const age = Math.round((now - this.latestAt) / 1000);
      $(this.el, ".age").textContent = age < 2 ? "· now" : `· ${age} s ago`;
    }

    setStale(stale) { this.el.classList.toggle("stale", stale); }
  }

  function tile(cameraId) {
    let t = tiles.get(cameraId);
    if (!t) {
      t = new Tile(cameraId);
      tiles.set(cameraId, t);
      document.getElementById("empty").hidden = true;
      t.el.querySelector(".control").hidden = !control.enabled;
      t.el.querySelector(".read-only").hidden = control.enabled;
      t.el.querySelector(".key-row").hidden = control.auth !== "token";
    }
    return t;
  }

  function endpointsText() {
    return ((serviceLink || {}).endpoints || []).map((e) => e.endpoint).join(", ") || "the inspection service";
  }

  function renderLink() {
    document.getElementById("empty").textContent = `Waiting for the first result from ${endpointsText()}…`;
    const el = document.getElementById("link");
    let text = "LIVE", cls = "link-live";
    if (!viewUp) { text = "DISCONNECTED — view server unreachable, retrying…"; cls = "link-down"; }
    else if (serviceLink && !serviceLink.connected) {
      const waiting = serviceLink.detail.startsWith("waiting") || serviceLink.detail === "starting";
      text = waiting ? `connecting — ${serviceLink.detail}` : `DISCONNECTED — ${serviceLink.detail}`;
      cls = waiting ? "link-wait" : "link-down";
    }
    el.textContent = text; el.className = `link ${cls}`;
    const live = cls === "link-live";
    document.body.dataset.link = live ? "live" : "down";
    for (const t of tiles.values()) t.setStale(!live);
  }

  function handlers() {
    return {
      snapshot(data) {
        control = data.control || control;
        keepFails = data.keep_fails || keepFails;
        keepScores = data.keep_scores || keepScores;
        for (const cam of data.cameras) tile(cam.camera_id).reset(cam);
        serviceLink = data.link;
      },
      result(data) { tile(data.camera_id).onResult(data.item, data.counters); },
      health(data) { tile(data.camera_id).setHealth(data.health, data.counters); },
      link(data) { serviceLink = data; },
      ping(data) { serviceLink = data; },
    };
  }

  function connect() {
    if (source) source.close();
    source = new EventSource("/events");
    for (const [name, handle] of Object.entries(handlers())) {
      source.addEventListener(name, (event) => {
        lastEvent = Date.now(); viewUp = true;
        handle(JSON.parse(event.data));
        renderLink();
      });
    }
    source.onerror = () => { viewUp = false; renderLink(); };  // EventSource retries by itself (retry: 2000)
  }

  setInterval(() => {
    const now = Date.now();
    document.getElementById("clock").textContent = new Date(now).toLocaleTimeString();
    if (now - lastEvent > SILENCE_MS) {  // a half-open connection or a refused one: start over
      viewUp = false; renderLink();
      lastEvent = now;
      connect();
    }
    for (const t of tiles.values()) t.tick(now);
  }, 1000);
  lastEvent = Date.now();
  connect();
})();
