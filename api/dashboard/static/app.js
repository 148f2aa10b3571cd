// quanttune dashboard: renders the jobs page and a job page from the JSON API (/v1), polling it
// while jobs run. Plain JS, no build step; plots with the locally served plotly.js.
"use strict";

(function () {
  const ACTIVE = new Set(["queued", "running"]);
  const COLORS = { good: "#1e8e3e", bad: "#c5221f", accent: "#2f6fde", muted: "#6b7383", fp32: "#e8a33d" };
  const PLOT_CONFIG = { displayModeBar: false, responsive: true };

  // ---------- helpers ----------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  async function api(path, options) {
    const init = Object.assign({ credentials: "same-origin" }, options || {});
    init.headers = Object.assign({ "X-Quanttune-Dashboard": "1", Accept: "application/json" }, init.headers || {});
    const response = await fetch("/v1" + path, init);
    if (response.status === 401) {
      location.href = "/dashboard/login?next=" + encodeURIComponent(location.pathname + location.search);
      throw new Error("your session ended: log in again");
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const error = new Error((body && body.error && body.error.message) || response.statusText);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  const isNum = (x) => typeof x === "number" && isFinite(x);
  const fmtNum = (x, digits = 4) => (isNum(x) ? Number(x.toPrecision(digits)).toString() : "–");
  const fmtPct = (x, digits = 1) => (isNum(x) ? (100 * x).toFixed(digits) + "%" : "–");
  const fmtDrop = (job, d) => (isNum(d) ? (job.relative ? (100 * d).toFixed(2) + "%" : fmtNum(d)) : "–");
  const fmtBytes = (n) => {
    if (!isNum(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  };
  const fmtDuration = (s) => (isNum(s) ? (s < 1 ? (1000 * s).toFixed(0) + " ms" : s < 120 ? s.toFixed(2) + " s" : (s / 60).toFixed(1) + " min") : "–");
  function fmtAge(iso) {
    if (!iso) return "–";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
    return (s / 86400).toFixed(1) + " d ago";
  }
  const plural = (n, word) => n + " " + word + (n === 1 ? "" : "s"); // 1 trial, 2 trials
  const metBudget = (job, drop) => isNum(drop) && drop <= job.max_drop + 1e-12;
  const scale = (job) => (job.relative ? 100 : 1); // drops shown in % when relative

  function budgetScore(job) {
    if (!isNum(job.baseline)) return null;
    const allowed = job.relative ? job.max_drop * Math.abs(job.baseline) : job.max_drop;
    return job.higher_is_better ? job.baseline - allowed : job.baseline + allowed;
  }

  function message(text) {
    const node = document.getElementById("message");
    if (!node) return;
    node.hidden = !text;
    node.textContent = text || "";
  }

  function stamp(active) {
    const node = document.getElementById("updated");
    if (node) node.textContent = (active ? "live · " : "") + "updated " + new Date().toLocaleTimeString();
  }

  function badge(status) {
    return el("span", { class: "badge status-" + status, text: status });
  }

  // the job's outcome as the API states it (`outcome`: "met" | "not_met" | "failed" | "cancelled",
  // null while queued or running), spelled as a CSS class suffix: "met", "not-met", ...
  function outcome(job) {
    return job.outcome ? job.outcome.replace("_", "-") : null;
  }

  function notMetTitle(job) {
    return job.met && isNum(job.deployed_drop)
      ? "the job finished, but the exported model misses the accuracy budget on ONNX Runtime (drop " + fmtDrop(job, job.deployed_drop) + ")"
      : "the job finished, but no plan met the accuracy budget";
  }

  function outcomeBadge(job) {
    return outcome(job) === "not-met"
      ? el("span", { class: "badge outcome-not-met", title: notMetTitle(job) }, "budget not met")
      : null;
  }

  // what a running job does before its first trial: the ledger's baseline is set once the FP32
  // baseline is evaluated, its layers once calibration and the per-layer error report are done
  function phaseOf(job, ledger, trials) {
    if (job.status === "queued") return "Queued: waiting for a worker";
    if (job.status !== "running" || !ledger) return null;
    if (!isNum(ledger.baseline)) return "Evaluating the FP32 baseline";
    if (!(ledger.layers || []).length) return "Calibrating and measuring per-layer errors";
    if (!(trials || []).length && !job.progress.trials) return "Searching: first trial";
    return "Searching";
  }

  // the deployed INT8 model's median latency (ms) on ONNX Runtime, 1 thread
  function latencyRow(d, batch) {
    const rows = (d && d.latency) || [];
    return rows.find((r) => r.batch === (batch === undefined ? d.calibration_batch : batch) && r.threads === 1) || null;
  }
  const fmtMs = (ms) => (isNum(ms) ? (ms < 1 ? Number(ms.toPrecision(2)).toString() : ms.toFixed(ms < 10 ? 2 : 1)) + " ms" : "–");

  function dropCell(job, drop) {
    if (!isNum(drop)) return el("span", { class: "muted", text: "–" });
    const ok = metBudget(job, drop);
    return el("span", { class: ok ? "ok" : "miss", title: ok ? "within the budget" : "over the budget" },
      fmtDrop(job, drop) + (ok ? " ≤ " : " > ") + fmtDrop(job, job.max_drop));
  }

  // ---------- jobs page ----------
  function jobsPage() {
    const filter = document.getElementById("status-filter");
    const tbody = document.querySelector("#jobs tbody");
    let timer = null;

    function row(job, ledger) {
      const p = job.progress;
      const done = job.status === "succeeded";
      const score = done ? job.score : p.best_score;
      const drop = done ? job.drop : p.best_drop;
      const coverage = done ? job.coverage : p.best_coverage;
      const phase = !p.trials ? phaseOf(job, ledger, null) : null;
      const progress = el("td", {}, phase ? el("span", { class: "phase" }, phase + "…")
        : (job.max_trials ? p.trials + " / " + plural(job.max_trials, "trial") : plural(p.trials, "trial")));
      if (job.max_trials && ACTIVE.has(job.status)) {
        const share = Math.min(1, p.trials / job.max_trials);
        progress.append(el("div", { class: "bar" }, el("span", { style: "width:" + (100 * share).toFixed(0) + "%" })));
      }
      const latency = latencyRow(job.deployment, 1);
      return el("tr", { "data-job-id": job.id, "data-status": job.status, "data-outcome": outcome(job),
                        class: outcome(job) ? "outcome-" + outcome(job) : null },
        el("td", {}, el("a", { href: "/dashboard/jobs/" + job.id, class: "job-link" }, "#" + job.id + " " + job.name)),
        el("td", {}, badge(job.status), outcomeBadge(job) ? " " : null, outcomeBadge(job)),
        progress,
        el("td", { class: "num" }, fmtNum(job.baseline)),
        el("td", { class: "num" }, fmtNum(score)),
        el("td", { class: "num" }, dropCell(job, drop)),
        el("td", { class: "num" }, fmtPct(coverage)),
        el("td", { class: "num" }, String(p.evaluations)),
        el("td", { class: "num" }, String(job.workers)),
        el("td", { class: "num latency", title: "INT8 on ONNX Runtime, batch 1, 1 thread" }, latency ? fmtMs(latency.int8_ms) : "–"),
        el("td", { title: job.created_at }, fmtAge(job.created_at)));
    }

    // the ledger of running jobs that have no trial yet: it tells their phase
    async function ledgers(jobs) {
      const starting = jobs.filter((job) => job.status === "running" && !job.progress.trials);
      const found = await Promise.all(starting.map((job) => api("/jobs/" + job.id + "/ledger").catch(() => null)));
      return new Map(starting.map((job, i) => [job.id, found[i]]));
    }

    async function refresh() {
      clearTimeout(timer);
      let active = false;
      try {
        const status = filter.value;
        const page = await api("/jobs?limit=200" + (status ? "&status=" + encodeURIComponent(status) : ""));
        active = page.data.some((job) => ACTIVE.has(job.status));
        const phases = await ledgers(page.data);
        const rows = page.data.map((job) => row(job, phases.get(job.id)));
        if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 11 }, status ? "No " + status + " jobs." : "No jobs yet.")));
        if (page.count > page.data.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 11 }, "Showing the newest " + page.data.length + " of " + page.count + " jobs.")));
        tbody.replaceChildren(...rows);
        message(null);
        stamp(active);
      } catch (error) {
        message("Could not load the jobs: " + error.message);
      }
      timer = setTimeout(refresh, active && !document.hidden ? 2000 : 10000);
    }

    filter.addEventListener("change", () => {
      const url = new URL(location.href);
      if (filter.value) url.searchParams.set("status", filter.value);
      else url.searchParams.delete("status");
      history.replaceState(null, "", url);
      refresh();
    });
    refresh();
  }

  // ---------- job page ----------
  function jobPage() {
    let job = JSON.parse(document.getElementById("job-data").textContent);
    let trials = [];
    let ledger = { layers: [], ledger: null };
    let report = null;
    let artifacts = null;
    let timer = null;
    const sort = { key: "number", dir: 1 };

    async function allTrials() {
      const found = [];
      for (let offset = 0; ; offset += 1000) {
        const page = await api("/jobs/" + job.id + "/trials?limit=1000&offset=" + offset);
        found.push(...page.data);
        if (found.length >= page.count || !page.data.length) return found;
      }
    }

    function bestTrial() {
      const score = job.status === "succeeded" ? job.score : job.progress.best_score;
      const coverage = job.status === "succeeded" ? job.coverage : job.progress.best_coverage;
      if (!isNum(score)) return null;
      const same = trials.filter((t) => t.state === "COMPLETE" && t.score === score && isNum(t.coverage) &&
        (!isNum(coverage) || Math.abs(t.coverage - coverage) < 1e-9));
      return same.length ? same[0].number : null;
    }

    // summary cards
    function renderSummary() {
      document.getElementById("job-name").textContent = job.name;
      const status = document.getElementById("job-status");
      status.textContent = job.status;
      status.className = "badge status-" + job.status;
      const outcomeNode = document.getElementById("job-outcome");
      outcomeNode.hidden = outcome(job) !== "not-met";
      if (!outcomeNode.hidden) outcomeNode.title = notMetTitle(job);
      document.body.dataset.outcome = outcome(job) || "";
      const phase = phaseOf(job, ledger, trials);
      const phaseNode = document.getElementById("job-phase");
      phaseNode.hidden = !phase;
      phaseNode.textContent = phase ? phase + "…" : "";
      // while the job starts, a card with nothing to show yet says what is running instead of a dash
      const pending = (value) => (value === "–" && phase && !trials.length ? el("span", { class: "phase" }, phase + "…") : value);
      document.getElementById("cancel-button").hidden = !ACTIVE.has(job.status);
      const reason = document.getElementById("job-reason");
      const why = job.error || job.reason;
      reason.hidden = !why;
      reason.textContent = why ? (job.error ? "Failed: " : "") + why : "";

      const done = job.status === "succeeded";
      const p = job.progress;
      const drop = done ? job.drop : p.best_drop;
      const baseline = isNum(job.baseline) ? job.baseline : ledger.baseline;
      const latency = latencyRow(job.deployment), latency1 = latencyRow(job.deployment, 1);
      const scoreError = ((job.deployment || {}).errors || {}).score;
      const cards = [
        ["Baseline (FP32)", pending(fmtNum(baseline)), job.higher_is_better ? "higher is better" : "lower is better"],
        [done ? "Score (INT8 plan)" : "Best score so far", pending(fmtNum(done ? job.score : p.best_score)), null],
        ["Drop vs budget", el("span", { class: isNum(drop) ? (metBudget(job, drop) ? "ok" : "miss") : "muted" }, fmtDrop(job, drop)),
          (isNum(drop) ? (metBudget(job, drop) ? "within" : "over") + " the " : "") + (job.relative ? "relative" : "absolute") +
          " budget " + fmtDrop(job, job.max_drop)],
        ["INT8 coverage", fmtPct(done ? job.coverage : p.best_coverage), "share of MACs"],
        ["Trials", p.trials + (job.max_trials ? " / " + job.max_trials : ""), plural(job.workers, "worker") + " now"],
        ["Evaluations", String(p.evaluations), "calls of the evaluation"],
        ["Deployed score", scoreError && !isNum(job.deployed_score) ? el("span", { class: "miss", title: scoreError }, "not measured")
          : fmtNum(job.deployed_score), scoreError && !isNum(job.deployed_score) ? scoreError : "ONNX Runtime, INT8"],
        ["Deployed latency", latency1 ? fmtMs(latency1.int8_ms) : "–", latency1 ? "INT8 on ONNX Runtime, batch 1, 1 thread" +
          (latency && latency !== latency1 ? "; batch " + latency.batch + ": " + fmtMs(latency.int8_ms) : "") +
          " (FP32 " + fmtMs(latency1.fp32_ms) + ")" : "INT8 on ONNX Runtime"],
        ["INT8 speed-up", speedupValue(job.deployment), speedupSub(job.deployment)],
        ["Age", fmtAge(job.created_at), job.finished_at ? "finished " + fmtAge(job.finished_at) : job.started_at ? "started " + fmtAge(job.started_at) : "not started"],
      ];
      document.getElementById("summary").replaceChildren(...cards.map(([label, value, sub]) =>
        el("div", { class: "stat", "data-card": label }, el("div", { class: "label", text: label }), el("div", { class: "value" }, value),
          sub ? el("div", { class: "sub", text: sub }) : null)));
    }

    function renderPlan() {
      const box = document.getElementById("plan-settings");
      const deployed = document.getElementById("deployed");
      if (!report) return;
      const layers = (report.plan && report.plan.layers) || {};
      const groups = new Map();
      for (const [name, config] of Object.entries(layers)) {
        if (config.precision !== "int8") continue;
        const key = [config.activation, config.scheme, config.weights].filter(Boolean).join(" · ") +
          (config.smooth ? " · smooth " + config.smooth : "");
        if (!groups.has(key)) groups.set(key, []);
        groups.get(key).push(name);
      }
      const list = el("dl", { class: "kv", id: "plan-groups" });
      for (const [key, names] of groups) list.append(el("dt", {}, key), el("dd", {}, names.join(", ")));
      const fp32 = report.fp32_layers || [];
      list.append(el("dt", {}, "FP32"), el("dd", {}, fp32.length ? fp32.join(", ") : "none"));
      box.replaceChildren(
        el("p", { class: "muted small" }, "Calibration (activation range) · scheme · weight granularity, per INT8 layer:"),
        list,
        el("p", { class: "small" }, (report.int8_layers || []).length + " of " + Object.keys(layers).length + " layers INT8" +
          (job.space ? " · search space: " + Object.entries(job.space).map(([k, v]) => k + " " + (Array.isArray(v) ? v.join("/") : JSON.stringify(v))).join(", ") : "")));
      const c = report.coverage || {};
      const onnx = artifacts && artifacts.data.find((a) => a.name === "model.onnx");
      deployed.replaceChildren(el("dl", { class: "kv", id: "deployed-figures" },
        el("dt", {}, "Score on ONNX Runtime"), el("dd", {}, fmtNum(report.deployed_score) +
          (isNum(report.deployed_drop) ? " (drop " + fmtDrop(job, report.deployed_drop) + ")" : "")),
        el("dt", {}, "Search's INT8 score"), el("dd", {}, fmtNum(report.score) +
          ((report.deployment || {}).scored_by === "search" ? " (this file, on ONNX Runtime)" : " (simulated)")),
        el("dt", {}, "Weights FP32 → plan"), el("dd", {}, fmtBytes(c.fp32_bytes) + " → " + fmtBytes(c.int8_bytes) +
          (isNum(c.fp32_bytes) && c.int8_bytes ? " (" + (c.fp32_bytes / c.int8_bytes).toFixed(2) + "× smaller)" : "")),
        el("dt", {}, "model.onnx"), el("dd", {}, onnx ? fmtBytes(onnx.size) : "–"),
        el("dt", {}, "INT8 share"), el("dd", {}, fmtPct(c.macs) + " of MACs, " + fmtPct(c.params) + " of parameters"),
        el("dt", {}, "Search time"), el("dd", {}, report.seconds ? fmtDuration(report.seconds.total) : "–")));
    }

    // what ONNX Runtime runs (INT8 kernels per planned INT8 layer) and how fast against FP32
    const speedupRow = latencyRow;

    function speedupValue(d) {
      const row = speedupRow(d);
      return row ? el("span", { class: row.speedup >= 1 ? "ok" : "miss" }, row.speedup.toFixed(2) + "×") : "–";
    }

    function speedupSub(d) {
      const row = speedupRow(d);
      if (!row) return "INT8 vs FP32 on ONNX Runtime";
      const one = speedupRow(d, 1);
      return "batch " + row.batch + ", 1 thread" + (one && one !== row ? "; batch 1: " + one.speedup.toFixed(2) + "×" : "");
    }

    function renderRuntime() {
      const box = document.getElementById("runtime");
      const d = job.deployment;
      if (!d) return;
      const parts = [];
      if (isNum(d.int8_kernels)) {
        const all = d.int8_kernels === d.int8_layers;
        parts.push(el("p", { id: "runtime-kernels" }, "INT8 kernels: ",
          el("strong", { class: all ? "ok" : "miss" }, d.int8_kernels + "/" + d.int8_layers),
          " planned INT8 layers · " + fmtPct(d.int8_macs_running) + " of MACs run INT8 (planned " + fmtPct(d.int8_macs_planned) + ")"));
      }
      if ((d.float_layers || []).length) {
        parts.push(el("ul", { id: "runtime-float", class: "float-layers" }, d.float_layers.map((f) =>
          el("li", { "data-layer": f.layer }, el("code", {}, f.layer), " ", el("span", { class: "miss" }, "runs in float"), ": " + (f.reason || "")))));
      }
      if ((d.latency || []).length) {
        const head = el("tr", {}, ["Batch", "Threads", "FP32 ms", "INT8 ms", "Speed-up"].map((h, i) => el("th", { class: i === 1 ? null : "num" }, h)));
        const rows = d.latency.map((r) => el("tr", { "data-batch": r.batch, "data-threads": r.threads },
          el("td", { class: "num" }, String(r.batch) + (r.batch === d.calibration_batch && r.batch !== 1 ? " (calibration)" : "")),
          el("td", {}, r.threads === 1 ? "1" : "all"),
          el("td", { class: "num" }, r.fp32_ms.toFixed(3)),
          el("td", { class: "num" }, r.int8_ms.toFixed(3)),
          el("td", { class: "num " + (r.speedup >= 1 ? "ok" : "miss") }, r.speedup.toFixed(2) + "×")));
        parts.push(el("table", { class: "grid compact", id: "runtime-latency" }, el("thead", {}, head), el("tbody", {}, rows)));
      }
      for (const [part, error] of Object.entries(d.errors || {})) {
        parts.push(el("p", { class: "error small" }, "Not measured (" + part + "): " + error));
      }
      box.replaceChildren(...parts);
    }

    function renderArtifacts() {
      const list = document.getElementById("artifacts");
      if (!artifacts || !artifacts.data.length) return;
      list.replaceChildren(...artifacts.data.map((a) => el("li", {},
        el("a", { href: "/v1/jobs/" + job.id + "/artifacts/" + encodeURIComponent(a.name), download: a.name, class: "artifact" }, a.name),
        el("span", { class: "muted small", title: "sha256 " + a.sha256 }, " " + fmtBytes(a.size)))));
    }

    // trials table (sortable)
    function trialValue(t, key) {
      const v = t[key];
      return v === null || v === undefined ? null : v;
    }

    function renderTrials() {
      const best = bestTrial();
      const rows = trials.slice().sort((a, b) => {
        const x = trialValue(a, sort.key), y = trialValue(b, sort.key);
        if (x === null && y === null) return a.number - b.number;
        if (x === null) return 1;
        if (y === null) return -1;
        if (x < y) return -sort.dir;
        if (x > y) return sort.dir;
        return a.number - b.number;
      }).map((t) => el("tr", { "data-trial": t.number, class: t.number === best ? "best" : null, title: t.error || null },
        el("td", { class: "num" }, String(t.number), t.duplicate_of !== null ? el("span", { class: "muted small", title: "repeated the plan of trial " + t.duplicate_of + ": not evaluated again" }, " = #" + t.duplicate_of) : null),
        el("td", { class: "state-" + t.state }, t.state),
        el("td", {}, t.summary || "–", t.error ? el("div", { class: "miss small" }, t.error) : null),
        el("td", { class: "num" }, fmtNum(t.score)),
        el("td", { class: "num" }, dropCell(job, t.drop)),
        el("td", { class: "num" }, fmtPct(t.coverage)),
        el("td", { class: "num" }, fmtDuration(t.duration_s)),
        el("td", { class: "worker small", title: t.worker || "" }, t.worker || "–")));
      const tbody = document.querySelector("#trials tbody");
      if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 8 }, "No trials yet.")));
      renderByWorker();
      tbody.replaceChildren(...rows);
      document.getElementById("trial-count").textContent = trials.length ? "(" + trials.length + ")" : "";
      for (const th of document.querySelectorAll("#trials th[data-key]")) {
        th.setAttribute("aria-sort", th.dataset.key === sort.key ? (sort.dir > 0 ? "ascending" : "descending") : "none");
      }
    }

    // per worker: trials run and evaluations made (the job's figures are their sums, plus the
    // baseline and the final ONNX Runtime check)
    function renderByWorker() {
      const by = new Map();
      for (const t of trials) {
        if (!t.worker) continue;
        const w = by.get(t.worker) || { trials: 0, evaluated: 0 };
        w.trials += 1;
        if (t.evaluated) w.evaluated += 1;
        by.set(t.worker, w);
      }
      const parts = [...by.entries()].sort().map(([name, w]) => name + ": " + plural(w.trials, "trial") + ", " + w.evaluated + " evaluated");
      document.getElementById("by-worker").textContent = parts.length ? "By worker — " + parts.join("; ") : "";
    }

    // plots
    function lineShape(y, color, dash) {
      return { type: "line", xref: "paper", x0: 0, x1: 1, yref: "y", y0: y, y1: y, line: { color, width: 1.5, dash } };
    }
    function label(y, text, color, below) {
      return { xref: "paper", x: below ? 1 : 0, xanchor: below ? "right" : "left", yref: "y", y,
        yanchor: below ? "top" : "bottom", text, showarrow: false, font: { size: 11, color } };
    }
    const layoutBase = () => ({ margin: { l: 56, r: 14, t: 10, b: 44 }, showlegend: false, hovermode: "closest",
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "#fbfcfd", font: { size: 12 } });

    function plotScore() {
      const scored = trials.filter((t) => isNum(t.score));
      const best = bestTrial();
      const trace = {
        type: "scatter", mode: "markers", name: "trials",
        x: scored.map((t) => t.number), y: scored.map((t) => t.score), text: scored.map((t) => t.summary || ""),
        marker: { size: 9, color: scored.map((t) => (metBudget(job, t.drop) ? COLORS.good : COLORS.bad)),
          line: { color: "#111", width: scored.map((t) => (t.number === best ? 2.5 : 0)) } },
        hovertemplate: "trial %{x}<br>score %{y:.4g}<br>%{text}<extra></extra>",
      };
      const layout = layoutBase();
      const last = trials.length ? trials[trials.length - 1].number : 1;
      layout.xaxis = { title: { text: "trial" }, zeroline: false, tick0: 0, dtick: Math.max(1, Math.ceil(last / 12)) };
      layout.yaxis = { title: { text: "score" } };
      layout.shapes = [];
      layout.annotations = [];
      if (isNum(job.baseline)) {
        layout.shapes.push(lineShape(job.baseline, COLORS.muted, "dash"));
        layout.annotations.push(label(job.baseline, "FP32 baseline " + fmtNum(job.baseline), COLORS.muted));
        const limit = budgetScore(job);
        layout.shapes.push(lineShape(limit, COLORS.bad, "dot"));
        layout.annotations.push(label(limit, "budget " + fmtNum(limit), COLORS.bad, true));
      }
      Plotly.react("plot-score", [trace], layout, PLOT_CONFIG);
    }

    function frontier(points) {
      // the best plans: no other plan has at least as much INT8 coverage with a smaller drop
      const sorted = points.slice().sort((a, b) => b.coverage - a.coverage || a.drop - b.drop);
      const front = [];
      let lowest = Infinity;
      for (const p of sorted) if (p.drop < lowest) { front.push(p); lowest = p.drop; }
      return front.reverse();
    }

    // the drop axis spans the budget: from below 0 to 3x the budget (a 1% budget is never flat on a
    // 0-60% axis); a drop above the top is drawn on the top edge as a triangle, its value in the hover
    function dropRange(budget, drops) {
      if (!(budget > 0)) return null;
      const low = Math.min(0, ...drops);
      return [Math.max(low, -budget) - 0.15 * budget, 3 * budget];
    }

    function plotDrop() {
      const k = scale(job);
      const points = trials.filter((t) => isNum(t.drop) && isNum(t.coverage));
      const best = bestTrial();
      const front = frontier(points);
      const range = dropRange(k * job.max_drop, points.map((t) => k * t.drop));
      const clip = (y) => (range ? Math.min(Math.max(y, range[0]), range[1]) : y);
      const off = (y) => range && (y > range[1] || y < range[0]);
      const trace = {
        type: "scatter", mode: "markers", name: "trials",
        x: points.map((t) => 100 * t.coverage), y: points.map((t) => clip(k * t.drop)),
        customdata: points.map((t) => k * t.drop),
        text: points.map((t) => "trial " + t.number + "<br>" + (t.summary || "")),
        marker: { size: 9, color: points.map((t) => (metBudget(job, t.drop) ? COLORS.good : COLORS.bad)), opacity: 0.85,
          symbol: points.map((t) => (off(k * t.drop) ? (k * t.drop > 0 ? "triangle-up" : "triangle-down") : "circle")),
          line: { color: "#111", width: points.map((t) => (t.number === best ? 2.5 : 0)) } },
        hovertemplate: "%{text}<br>INT8 %{x:.1f}% of MACs<br>drop %{customdata:.3g}" + (job.relative ? "%" : "") + "<extra></extra>",
      };
      const line = {
        type: "scatter", mode: "lines", name: "frontier", hoverinfo: "skip",
        x: front.map((t) => 100 * t.coverage), y: front.map((t) => clip(k * t.drop)),
        line: { color: COLORS.accent, width: 1.5, shape: "vh" },
      };
      const layout = layoutBase();
      layout.xaxis = { title: { text: "INT8 coverage (% of MACs)" }, range: [-4, 104] };
      layout.yaxis = range ? { title: { text: "drop" + (job.relative ? " (%)" : "") + ", zoomed on the budget" }, range }
        : { title: { text: "drop" + (job.relative ? " (%)" : "") }, rangemode: "tozero" };
      layout.shapes = [lineShape(k * job.max_drop, COLORS.bad, "dot")];
      layout.annotations = [label(k * job.max_drop, "budget " + fmtDrop(job, job.max_drop), COLORS.bad, false)];
      Plotly.react("plot-drop", [line, trace], layout, PLOT_CONFIG);
    }

    function plotSqnr() {
      const data = ledger.ledger;
      document.getElementById("sqnr-empty").hidden = Boolean(data);
      document.getElementById("plot-sqnr").hidden = !data;
      if (!data) return;
      const layers = ledger.layers.filter((name) => data[name]);
      const settings = [];
      for (const name of layers) for (const s of Object.keys(data[name].sqnr_db || {})) if (!settings.includes(s)) settings.push(s);
      const chosen = (name) => {
        const d = data[name].decision || "";
        return d.startsWith("int8 ") ? d.slice(5) : null;
      };
      // one row per layer, one column per INT8 setting; the chosen plan's setting of each layer outlined
      const z = layers.map((name) => settings.map((s) => (isNum(data[name].sqnr_db[s]) ? data[name].sqnr_db[s] : null)));
      const heat = {
        type: "heatmap", name: "SQNR", x: settings, y: layers, z, colorscale: "Viridis", xgap: 1, ygap: 1,
        colorbar: { title: { text: "dB", side: "right" }, thickness: 12 }, hoverongaps: false,
        hovertemplate: "%{y}<br>%{x}<br>SQNR %{z:.1f} dB<extra></extra>",
      };
      const picked = layers.filter((name) => settings.includes(chosen(name)));
      const marks = {
        type: "scatter", mode: "markers", name: "chosen", x: picked.map(chosen), y: picked, hoverinfo: "skip",
        marker: { symbol: "square-open", size: 16, color: "#e8175d", line: { width: 2.5 } },
      };
      const traces = [heat, marks];
      const layout = layoutBase();
      layout.margin = { l: 110, r: 10, t: 10, b: 150 };
      layout.xaxis = { title: { text: "INT8 setting (framed: the chosen plan's setting of the layer)" }, type: "category",
        tickangle: -35, automargin: true };
      layout.yaxis = { type: "category", autorange: "reversed", automargin: true };
      document.getElementById("plot-sqnr").style.height = Math.max(260, 40 + 26 * layers.length + 150) + "px";
      Plotly.react("plot-sqnr", traces, layout, PLOT_CONFIG);
    }

    function runsAs(name) {
      const layers = report && report.deployment && report.deployment.kernels ? report.deployment.kernels.layers : null;
      const k = layers ? layers[name] : null;
      if (!k || k.planned !== "int8") return el("td", { class: "muted runs-as" }, "–");
      return el("td", { class: "runs-as " + (k.int8 ? "ok" : "miss"), title: k.reason || "" },
        (k.kernel || "?") + (k.int8 ? " (INT8)" : " (float)"));
    }

    function renderLedger() {
      const data = ledger.ledger || {};
      const tbody = document.querySelector("#ledger tbody");
      const rows = ledger.layers.map((name) => {
        const entry = data[name];
        const decision = entry ? entry.decision : null;
        const strip = el("div", { class: "strip" }, trials.map((t) => {
          const planned = t.summary !== null && t.summary !== undefined;
          const state = planned ? (t.fp32_layers.includes(name) ? "fp32" : "int8") : "none";
          return el("i", { class: "cell " + state, "data-trial": t.number,
            title: "trial " + t.number + ": " + (planned ? state.toUpperCase() : "no plan") + (t.state !== "COMPLETE" ? " (" + t.state + ")" : "") });
        }));
        return el("tr", { "data-layer": name },
          el("td", {}, el("code", {}, name)),
          el("td", { class: decision ? (decision.startsWith("fp32") ? "decision-fp32" : "decision-int8") : "muted" }, decision || "–"),
          runsAs(name),
          el("td", { class: "num" }, entry && entry.sensitivity_rank !== null ? String(entry.sensitivity_rank) : "–"),
          el("td", { class: "num" }, entry ? fmtPct(entry.macs_share) : "–"),
          el("td", { class: "num" }, entry ? fmtNum(entry.best_sqnr_db, 3) : "–"),
          el("td", {}, strip),
          el("td", { class: "reason-text" }, entry ? entry.reason : ""));
      });
      if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: 8 }, "No layers yet: they are known once the search started.")));
      tbody.replaceChildren(...rows);
    }

    function render() {
      renderSummary();
      renderPlan();
      renderRuntime();
      renderArtifacts();
      renderTrials();
      renderLedger();
      if (window.Plotly) {
        plotScore();
        plotDrop();
        plotSqnr();
      } else {
        message("plotly.js did not load: the plots are unavailable.");
      }
    }

    async function refresh() {
      clearTimeout(timer);
      try {
        [job, trials, ledger] = await Promise.all([api("/jobs/" + job.id), allTrials(), api("/jobs/" + job.id + "/ledger")]);
        if (job.status === "succeeded" && !report) {
          [report, artifacts] = await Promise.all([api("/jobs/" + job.id + "/report"), api("/jobs/" + job.id + "/artifacts")]);
        }
        message(null);
      } catch (error) {
        if (error.status === 404) {
          message("This job no longer exists.");
          return;
        }
        message("Could not refresh: " + error.message);
      }
      render();
      const active = ACTIVE.has(job.status);
      stamp(active);
      document.body.dataset.ready = active ? "live" : "final";
      if (active) timer = setTimeout(refresh, document.hidden ? 10000 : 2000);
    }

    for (const th of document.querySelectorAll("#trials th[data-key]")) {
      th.addEventListener("click", () => {
        sort.dir = sort.key === th.dataset.key ? -sort.dir : 1;
        sort.key = th.dataset.key;
        renderTrials();
      });
    }

    const cancel = document.getElementById("cancel-button");
    cancel.addEventListener("click", async () => {
      if (!window.confirm("Cancel job #" + job.id + " (" + job.name + ")? Workers stop before their next trial.")) return;
      cancel.disabled = true;
      try {
        job = await api("/jobs/" + job.id + "/cancel", { method: "POST" });
        message(null);
      } catch (error) {
        message("Could not cancel: " + error.message);
      } finally {
        cancel.disabled = false;
      }
      refresh();
    });

    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const page = document.body.dataset.page;
    if (page === "jobs") jobsPage();
    else if (page === "job") jobPage();
  });
})();
