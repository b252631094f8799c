/* tuneforge ui: one small script per page, plain DOM + fetch (no build step, no CDN). */
(function () {
  "use strict";
  const $ = (sel, root) => (root || document).querySelector(sel);
  const q = new URLSearchParams(location.search);

  function h(tag, attrs, ...kids) {
    const node = document.createElement(tag);
    for (const k in attrs || {}) {
      if (k === "text") node.textContent = attrs[k];
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), attrs[k]);
      else if (attrs[k] !== undefined && attrs[k] !== null && attrs[k] !== false) node.setAttribute(k, attrs[k] === true ? "" : attrs[k]);
    }
    for (const kid of kids.flat()) if (kid !== null && kid !== undefined) node.append(kid instanceof Node ? kid : String(kid));
    return node;
  }
  async function api(path, body) {
    const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
    const res = await fetch(path, opts);
    let data;
    try { data = await res.json(); } catch (e) { data = {error: res.status + " " + res.statusText}; }
    if (!res.ok && !data.error) data.error = res.status + " " + res.statusText;
    return data;
  }
  function flash(text, kind) {
    const box = $("#flash");
    box.replaceChildren(h("span", {class: kind || "info", text}));
  }
  function fmtNum(v) {
    if (v === null || v === undefined || v === "") return "";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 ? v.toExponential(3) : (+v.toPrecision(4)).toString();
  }
  function ago(t) {
    if (!t) return "";
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return new Date(t * 1000).toISOString().slice(0, 16).replace("T", " ");
  }
  function badge(status) { return h("span", {class: "badge status-" + status, text: status}); }
  function table(rows, cols, label) {
    const t = h("table", {class: "grid", "aria-label": label || ""});
    t.append(h("thead", {}, h("tr", {}, cols.map(c => h("th", {scope: "col", text: c[1]})))));
    t.append(h("tbody", {}, rows.map(r => h("tr", {}, cols.map(c => {
      const v = typeof c[0] === "function" ? c[0](r) : r[c[0]];
      return h("td", {class: typeof v === "number" ? "num" : ""}, v instanceof Node ? v : fmtNum(v));
    })))));
    return t;
  }
  // the numeric result columns of eval rows ({"model", "ppl", "exact", ..., "metrics": [names], "time"})
  function numericKeys(rows) { return [...new Set(rows.flatMap(r => Object.keys(r).filter(k => typeof r[k] === "number")))]; }
  function poll(fn, ms) { let stop = false; (async function loop() { while (!stop) { try { await fn(); } catch (e) { console.error(e); } await new Promise(r => setTimeout(r, ms)); } })(); return () => { stop = true; }; }
  async function options(select, withNone) {
    const data = await api("/api/targets");
    const keep = select.value;
    select.replaceChildren(...(withNone ? [h("option", {value: "", text: withNone})] : []),
      ...data.targets.map(t => h("option", {value: t.id, text: t.label})));
    if (keep) select.value = keep;
    return data.targets;
  }
  function jobBox(box, job, onDone) {
    // follows a job: state, command, the tail of its log, and what it produced
    box.replaceChildren(h("p", {}, "Job ", h("a", {href: "/jobs?id=" + job.id, text: job.id}), " started: ", h("code", {text: job.command})));
    const state = h("p", {class: "job-state"}), tail = h("pre", {class: "box log-tail"});
    box.append(state, tail);
    const stop = poll(async () => {
      const j = await api("/api/job?id=" + encodeURIComponent(job.id));
      if (j.error) { state.textContent = j.error; return; }
      state.replaceChildren("State: ", badge(j.state), j.returncode !== null && j.returncode !== undefined ? " (exit code " + j.returncode + ")" : "");
      tail.textContent = j.log_tail.split("\n").slice(-25).join("\n");
      if (!j.alive) { stop(); if (onDone) onDone(j); }
    }, 1000);
  }

  // ---------------------------------------------------------------- runs list
  function pageRuns() {
    let sortKey = "updated", asc = false, rows = [];
    const body = $("#runs tbody");
    document.querySelectorAll("#runs th").forEach(th => th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.key;
      asc = sortKey === key ? !asc : key !== "updated";
      sortKey = key;
      document.querySelectorAll("#runs th").forEach(o => o.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      render();
    }));
    function render() {
      const sorted = [...rows].sort((a, b) => {
        let x = a[sortKey], y = b[sortKey];
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      body.replaceChildren(...sorted.map(r => h("tr", {"data-run": r.id, "data-status": r.status},
        h("td", {}, r.kind === "study" ? h("a", {href: "/search", text: r.id}) : r.job ? h("a", {href: "/jobs?id=" + encodeURIComponent(r.job), text: r.id}) : h("a", {href: "/run?id=" + encodeURIComponent(r.id), text: r.id}),
          r.kind !== "run" ? h("span", {class: "muted small", text: " " + r.kind}) : ""),
        h("td", {text: r.stage || ""}), h("td", {text: r.method || ""}), h("td", {text: r.base || ""}),
        h("td", {}, badge(r.status)),
        h("td", {class: "num", text: r.step === null ? "" : r.step + (r.total ? " / " + r.total : "")}),
        h("td", {class: "num", text: fmtNum(r.last_loss)}), h("td", {text: ago(r.updated), title: r.updated ? new Date(r.updated * 1000).toISOString() : ""}))));
      $("#runs-empty").hidden = rows.length > 0;
    }
    poll(async () => { const d = await api("/api/runs"); if (d.runs) { rows = d.runs; render(); } }, 2000);
  }

  // ---------------------------------------------------------------- run page
  const CHARTS = [
    ["loss", "Loss", [["train", "log", "loss"], ["eval", "eval", "eval_loss"]]],
    ["lr", "Learning rate", [["lr", "log", "lr"]]],
    ["grad_norm", "Gradient norm", [["grad_norm", "log", "grad_norm"]]],
    ["tokens", "Tokens/s", [["tokens/s", "log", "train_tokens_per_second"]]],
    ["memory", "Memory (MiB)", [["memory", "log", "memory_mib"], ["memory", "log", "mem_mib"]]],
    ["reward", "Reward margin / accuracy", [["margin", "log", "rewards/margins"], ["accuracy", "log", "rewards/accuracies"], ["reward", "log", "reward"]]],
    ["kl", "KL", [["kl", "log", "kl"], ["kl", "log", "objective/kl"]]],
  ];
  function pageRun() {
    const id = q.get("id");
    let offset = 0, status = "";
    const charts = new Map();
    const holder = $("#charts");
    $("#link-chat").href = "/chat?a=" + encodeURIComponent("run:" + id) + "&b=" + encodeURIComponent("base:" + id);
    function chart(key, title) {
      if (!charts.has(key)) charts.set(key, new LineChart(holder, title, key));
      return charts.get(key);
    }
    function addEvents(events) {
      for (const ev of events) {
        for (const [key, title, series] of CHARTS) for (const [name, kind, field] of series) {
          if (ev.event === kind && typeof ev[field] === "number") chart(key, title).add(name, ev.step, ev[field]);
        }
        if (ev.event === "log") for (const k in ev) if (/^(memory|mem)_.*(mib|gb|bytes)/i.test(k) && typeof ev[k] === "number") chart("memory", "Memory").add(k, ev.step, ev[k]);
      }
      for (const c of charts.values()) c.draw();
      let n = 0; for (const c of charts.values()) n += c.points();
      $("#curve-info").textContent = n ? n + " points · updates while the run trains" : "no metrics yet";
    }
    async function metrics() {
      const d = await api("/api/run/metrics?id=" + encodeURIComponent(id) + "&offset=" + offset);
      if (d.events && d.events.length) addEvents(d.events);
      if (d.offset !== undefined) offset = d.offset;
    }
    async function detail() {
      const d = await api("/api/run?id=" + encodeURIComponent(id));
      if (d.error) { flash(d.error, "error"); return; }
      const info = d.info;
      status = info.status;
      $("#run-status").replaceChildren(badge(info.status));
      $("#run-facts").textContent = [info.stage, info.method, info.base, info.step !== null ? "step " + info.step + (info.total ? " / " + info.total : "") : "",
        info.last_loss !== null ? "loss " + fmtNum(info.last_loss) : "", info.pid ? "pid " + info.pid : ""].filter(Boolean).join(" · ");
      $("#btn-stop").disabled = info.status !== "running";
      $("#btn-resume").disabled = !(info.status === "interrupted" && info.resumable);
      $("#link-report").hidden = !info.has_report;
      $("#link-report").href = "/run/report?id=" + encodeURIComponent(id);
      $("#config").textContent = d.config;
      $("#summary").textContent = d.summary ? JSON.stringify(d.summary, null, 1) : "— (written when training ends)";
      const warns = d.warnings || [];
      $("#warnings").replaceChildren(...(warns.length ? warns.map(w => h("div", {class: "warning"},
        h("strong", {text: "step " + w.step + " [" + w.kind + "] "}), w.message, h("div", {class: "advice", text: w.advice ? "Advice: " + w.advice : ""})))
        : [h("p", {class: "muted", text: "none"})]));
      const evals = Array.isArray(d.eval_results) ? d.eval_results : (d.eval_results && d.eval_results.results) || [];
      if (evals.length) {
        const keys = numericKeys(evals).slice(0, 8);
        $("#evals").replaceChildren(table(evals, [["time", "when"], [e => (e.data || "").split("/").pop(), "data"], ...keys.map(k => [k, k])], "Eval results"));
      }
      $("#run-jobs").replaceChildren(...(d.jobs.length ? [table(d.jobs, [[j => h("a", {href: "/jobs?id=" + j.id, text: j.title}), "job"], [j => badge(j.state), "state"], [j => ago(j.started), "started"]], "Jobs")] : [h("p", {class: "muted", text: "none from this UI"})]));
    }
    poll(metrics, 1500);
    poll(detail, 2500);
    async function act(path, body, what) {
      const d = await api(path, body);
      if (d.error) flash(d.error, "error"); else flash(d.message || (d.job ? what + " started: " + d.job.command : what), "info");
      detail();
    }
    $("#btn-stop").addEventListener("click", () => act("/api/run/stop", {id}, "stop"));
    $("#btn-resume").addEventListener("click", () => act("/api/run/resume", {id}, "resume"));
    $("#btn-eval").addEventListener("click", () => act("/api/run/eval", {id, data: $("#eval-data").value, metrics: $("#eval-metrics").value}, "evaluation"));
    $("#btn-report").addEventListener("click", () => act("/api/run/report", {id}, "report"));
  }

  // ---------------------------------------------------------------- new run form
  function pageNew() {
    const widgets = {}, defaults = {}, inputs = {};
    let timer = null, last = null;
    function text(v) { return v === null || v === undefined ? "" : Array.isArray(v) ? v.join(", ") : String(v); }
    function fieldRow(f) {
      const id = "f-" + f.key.replace(/\./g, "-") + (f.method ? "--" + f.method : "");
      let input;
      if (f.widget === "select") {
        input = h("select", {id}, f.choices.map(c => h("option", {value: c === null ? "" : String(c), text: c === null ? "(not set)" : String(c)})));
        input.value = text(f.default);
      } else if (f.widget === "checkbox") {
        input = h("input", {id, type: "checkbox"});
        input.checked = !!f.default;
      } else {
        input = h("input", {id, type: "text", inputmode: f.widget === "number" ? "decimal" : null, placeholder: text(f.default)});
        input.value = "";
      }
      input.dataset.key = f.key;
      if (f.method) input.dataset.method = f.method;
      widgets[f.key] = f.widget; defaults[id] = f.default;
      inputs[id] = {input, f};
      const row = h("div", {class: "field", "data-key": f.key, "data-method": f.method || null},
        h("label", {for: id, text: f.label}), input,
        h("div", {class: "help", id: id + "-help", text: (f.help ? f.help + " · " : "") + "default: " + (f.default === null || f.default === undefined ? "not set" : JSON.stringify(f.default))}),
        h("div", {class: "err", id: id + "-err", role: "alert"}));
      input.setAttribute("aria-describedby", id + "-help " + id + "-err");
      return row;
    }
    function collect() {
      const values = {};
      const method = $("#f-method-name").value;
      const source = document.querySelector("input[name=source]:checked").value;
      for (const id in inputs) {
        const {input, f} = inputs[id];
        if (f.method && f.method !== method) continue;
        const fc = f.key.startsWith("model.from_config.");
        if (fc && source !== "from_config") continue;
        if (f.key === "model.name_or_path" && source === "from_config") continue;
        let v;
        if (f.widget === "checkbox") v = input.checked;
        else v = input.value;
        const isDefault = f.widget === "checkbox" ? v === !!f.default : (f.widget === "select" ? v === text(f.default) : v === "");
        if (isDefault && !fc && f.key !== "method.name" && f.key !== "run_name") continue;
        if (f.widget !== "checkbox" && v === "") {
          if (fc && f.default !== null && f.default !== undefined) v = text(f.default); else continue;
        }
        values[f.key] = v;
      }
      return {values, widgets, extra: $("#extra-yaml").value};
    }
    const methodRows = {};
    function showMethod() {
      const m = $("#f-method-name").value;
      // only the chosen method's own fields are in the page (each method has its own r, alpha, ...)
      $("#method-fields").replaceChildren(...(methodRows[m] || []));
      const fc = document.querySelector("input[name=source]:checked").value === "from_config";
      document.querySelectorAll(".field").forEach(row => {
        if (row.dataset.key.startsWith("model.from_config.")) row.hidden = !fc;
        if (row.dataset.key === "model.name_or_path") row.hidden = fc;
      });
    }
    async function validate() {
      const body = collect();
      const d = await api("/api/validate", body);
      last = d;
      $("#yaml").textContent = d.yaml || "";
      document.querySelectorAll(".field").forEach(r => { r.classList.remove("invalid"); const e = r.querySelector(".err"); if (e) e.textContent = ""; });
      const box = $("#errors");
      if (d.ok) { box.replaceChildren(h("p", {class: "ok", text: "valid — ready to start"})); $("#btn-start").disabled = false; return d; }
      $("#btn-start").disabled = true;
      box.replaceChildren(...(d.errors || [{message: d.error}]).map(e => h("div", {class: "e", text: "- " + e.message})));
      for (const e of d.errors || []) {
        const key = (e.key || "").replace(/\[\d+\]$/, "");
        const row = [...document.querySelectorAll(".field")].find(r => !r.hidden && (r.dataset.key === key || key.startsWith(r.dataset.key + ".")));
        if (row) { row.classList.add("invalid"); row.querySelector(".err").textContent = e.message; }
      }
      return d;
    }
    function soon() { clearTimeout(timer); timer = setTimeout(validate, 250); }
    (async function init() {
      const form = await api("/api/form");
      const holder = $("#sections");
      const names = {run: "Run", model: "Model", method: "Method", data: "Data", train: "Training"};
      for (const [section, fields] of Object.entries(form.sections)) {
        const fs = h("fieldset", {id: "section-" + section}, h("legend", {text: names[section] || section}));
        const advanced = h("details", {}, h("summary", {text: "More " + (names[section] || section).toLowerCase() + " keys"}));
        const main = ["run_name", "seed", "stage", "model.name_or_path", "model.chat_template", "model.precision", "method.name", "method.r", "method.alpha",
          "method.dropout", "method.target_modules", "data.train", "data.eval", "data.eval_split", "data.max_length", "data.packing", "train.epochs",
          "train.max_steps", "train.batch_size", "train.grad_accum", "train.lr", "train.scheduler", "train.warmup_ratio", "train.eval_steps", "train.save_steps",
          "train.logging_steps", "train.report_to"];
        for (const f of fields) {
          const row = fieldRow(f);
          if (f.method) { (methodRows[f.method] = methodRows[f.method] || []).push(row); continue; }
          (main.includes(f.key) || f.key.startsWith("model.from_config.") ? fs : advanced).append(row);
          if (f.key === "method.name") fs.append(h("div", {id: "method-fields"}));
        }
        if (advanced.children.length > 1) fs.append(advanced);
        holder.append(fs);
      }
      if (q.get("run_name")) $("#f-run_name").value = q.get("run_name");
      $("#f-method-name").addEventListener("change", showMethod);
      document.querySelectorAll("input[name=source]").forEach(r => r.addEventListener("change", () => { showMethod(); soon(); }));
      $("#new-form").addEventListener("input", soon);
      $("#new-form").addEventListener("change", soon);
      showMethod();
      validate();
    })();
    $("#btn-copy").addEventListener("click", () => { navigator.clipboard && navigator.clipboard.writeText($("#yaml").textContent); flash("YAML copied"); });
    $("#btn-estimate").addEventListener("click", async () => {
      $("#estimate").textContent = "estimating…";
      const d = await api("/api/estimate", {...collect(), gpu_mem: $("#gpu-mem").value});
      if (d.error) { $("#estimate").replaceChildren(h("p", {class: "e", text: d.error})); return; }
      const bill = d.bill, gib = b => (b / 2 ** 30).toFixed(2) + " GiB";
      const rows = Object.entries(bill.components).map(([k, v]) => ({part: k, size: gib(v)}));
      rows.push({part: "total (peak: " + bill.peak_phase + ")", size: gib(bill.total_bytes)});
      const kids = [table(rows, [["part", "part"], ["size", "size"]], "Memory bill"),
        h("p", {class: "muted small", text: bill.trainable_params.toLocaleString() + " trainable of " + bill.total_params.toLocaleString() + " parameters"})];
      if (d.fits !== undefined) kids.push(h("p", {text: d.fits ? "fits the budget (10% margin)" : "does NOT fit the budget"}));
      if (d.recommendation) kids.push(h("p", {}, h("strong", {text: "Recommendation: "}), "method " + JSON.stringify(d.recommendation.method) + ", train " + JSON.stringify(d.recommendation.train)),
        h("p", {class: "muted small", text: d.recommendation.explanation}));
      if (d.recommendation_error) kids.push(h("p", {class: "e", text: d.recommendation_error}));
      $("#estimate").replaceChildren(...kids);
    });
    $("#btn-preview").addEventListener("click", async () => {
      $("#preview").textContent = "rendering (a from_config model trains its tokenizer first)…";
      const d = await api("/api/preview", collect());
      if (d.error) { $("#preview").textContent = d.error + (d.errors ? "\n" + d.errors.map(e => e.message).join("\n") : ""); return; }
      $("#preview").innerHTML = d.html;  // escaped server-side; only <mark> added
    });
    $("#btn-start").addEventListener("click", async () => {
      const d = await api("/api/start", collect());
      if (d.error || !d.job) { flash(d.error || (d.errors || []).map(e => e.message).join("; "), "error"); return; }
      $("#start-result").replaceChildren("started: ", h("a", {href: "/run?id=" + encodeURIComponent(d.run), text: d.run}));
      flash("training started as a detached process: " + d.job.command);
    });
  }

  // ---------------------------------------------------------------- chat
  function pageChat() {
    const hist = {a: [], b: []};
    (async () => {
      await options($("#model-a"));
      await options($("#model-b"), "(none: one model)");
      if (q.get("a")) $("#model-a").value = q.get("a");
      if (q.get("b")) $("#model-b").value = q.get("b");
      layout();
    })();
    function layout() {
      const two = !!$("#model-b").value;
      $("#pane-b").hidden = !two;
      $("#title-a").textContent = $("#model-a").selectedOptions[0] ? $("#model-a").selectedOptions[0].textContent : "A";
      $("#title-b").textContent = two ? $("#model-b").selectedOptions[0].textContent : "B";
    }
    $("#model-a").addEventListener("change", () => { layout(); clear(); });
    $("#model-b").addEventListener("change", () => { layout(); clear(); });
    function clear() { hist.a = []; hist.b = []; $("#log-a").replaceChildren(); $("#log-b").replaceChildren(); }
    $("#btn-clear").addEventListener("click", clear);
    $("#message").addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); } });
    async function ask(side, targets, target) {
      const log = $("#log-" + side);
      const out = h("div", {class: "msg assistant", "data-role": "assistant", text: "…"});
      log.append(out);
      const body = {targets, target, messages: hist[side], system: $("#system").value,
        temperature: $("#temperature").value, top_p: $("#top-p").value, max_tokens: $("#max-tokens").value};
      const res = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      if (!res.ok) { const d = await res.json().catch(() => ({})); out.className = "msg error"; out.textContent = d.error || res.statusText; return; }
      const reader = res.body.getReader(), dec = new TextDecoder();
      let buf = "", text = "";
      out.textContent = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += dec.decode(value, {stream: true});
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const line = buf.slice(0, i); buf = buf.slice(i + 2);
          if (!line.startsWith("data: ")) continue;
          const ev = JSON.parse(line.slice(6));
          if (ev.delta) { text += ev.delta; out.textContent = text; log.scrollTop = log.scrollHeight; }
          if (ev.error) { out.className = "msg error"; out.textContent = ev.error; return; }
          if (ev.done) break;
        }
      }
      out.dataset.chars = String(text.length);
      if (!text) out.textContent = "(empty answer: the model ended its turn at once)";
      else if (!text.trim()) out.textContent = "(only whitespace: " + JSON.stringify(text) + ")";
      out.dataset.done = "1";
      hist[side].push({role: "assistant", content: text});
    }
    $("#chat-form").addEventListener("submit", async e => {
      e.preventDefault();
      const text = $("#message").value.trim();
      if (!text) return;
      $("#message").value = "";
      const a = $("#model-a").value, b = $("#model-b").value;
      const targets = b ? [a, b] : [a];
      const sides = b ? [["a", a], ["b", b]] : [["a", a]];
      $("#btn-send").disabled = true;
      for (const [side] of sides) { hist[side].push({role: "user", content: text}); $("#log-" + side).append(h("div", {class: "msg user", text})); }
      await Promise.all(sides.map(([side, target]) => ask(side, targets, target)));
      $("#btn-send").disabled = false;
    });
  }

  // ---------------------------------------------------------------- compare: eval + A/B
  function pageCompare() {
    (async () => {
      const targets = await options($("#ab-a"));
      await options($("#ab-b"));
      if (targets.length > 1) $("#ab-b").value = targets[1].id;
      const runs = targets.filter(t => t.id.startsWith("run:"));
      $("#eval-runs").replaceChildren(...runs.map(t => h("label", {class: "block"}, h("input", {type: "checkbox", value: t.id}), " " + t.label)));
      sheets();
    })();
    $("#btn-eval").addEventListener("click", async () => {
      const runs = [...document.querySelectorAll("#eval-runs input:checked")].map(i => i.value);
      const d = await api("/api/eval", {runs, data: $("#eval-data").value, metrics: $("#eval-metrics").value, limit: $("#eval-limit").value});
      if (d.error) { flash(d.error, "error"); return; }
      jobBox($("#eval-job"), d.job, j => {
        if (!j.result) return;
        const rows = Array.isArray(j.result) ? j.result : j.result.results || [j.result];
        $("#eval-job").append(h("h3", {text: "Results"}), table(rows, [["model", "model"], ...numericKeys(rows).map(k => [k, k])], "Eval results"));
      });
    });
    async function sheets(select) {
      const d = await api("/api/abtest/sheets");
      $("#ab-sheet").replaceChildren(...d.sheets.map(s => h("option", {value: s, text: s})));
      if (select) $("#ab-sheet").value = select;
      if ($("#ab-sheet").value) items();
    }
    $("#ab-sheet").addEventListener("change", items);
    $("#btn-ab").addEventListener("click", async () => {
      const d = await api("/api/abtest", {a: $("#ab-a").value, b: $("#ab-b").value, prompts: $("#ab-prompts").value, limit: $("#ab-limit").value,
        max_new_tokens: $("#ab-max-tokens").value});
      if (d.error) { flash(d.error, "error"); return; }
      jobBox($("#ab-job"), d.job, j => { if (j.returncode === 0) sheets(d.sheet); });
    });
    // an empty or whitespace-only answer is shown as such (a blank box reads as "still loading")
    const shown = t => !t ? "(empty answer)" : !t.trim() ? "(only whitespace: " + JSON.stringify(t) + ")" : t;
    async function items() {
      const sheet = $("#ab-sheet").value;
      const d = await api("/api/abtest?sheet=" + encodeURIComponent(sheet));
      if (d.error) { $("#ab-items").textContent = d.error; return; }
      $("#ab-items").replaceChildren(...d.items.map(it => {
        const box = h("div", {class: "ab-item", "data-item": it.id, "data-voted": it.vote || null},
          h("p", {}, h("strong", {text: it.id + " "}), it.prompt),
          h("div", {class: "pair"}, h("div", {class: "ans", "aria-label": "Left answer to " + it.id, text: shown(it.left)}), h("div", {class: "ans", "aria-label": "Right answer to " + it.id, text: shown(it.right)})));
        const group = h("div", {class: "toolbar", role: "group", "aria-label": "Vote on " + it.id});
        for (const [vote, label] of [["left", "Left is better"], ["tie", "Tie"], ["right", "Right is better"]]) {
          const b = h("button", {type: "button", "aria-pressed": it.vote === vote ? "true" : "false", "aria-label": label + " (" + it.id + ")", text: label});
          b.addEventListener("click", async () => {
            const r = await api("/api/abtest/vote", {sheet, item: it.id, vote});
            if (r.error) { flash(r.error, "error"); return; }
            group.querySelectorAll("button").forEach(x => x.setAttribute("aria-pressed", x === b ? "true" : "false"));
            box.dataset.voted = vote;
            flash(r.voted + " of " + r.total + " voted");
          });
          group.append(b);
        }
        box.append(group);
        return box;
      }));
    }
    $("#btn-score").addEventListener("click", async () => {
      const d = await api("/api/abtest/score?sheet=" + encodeURIComponent($("#ab-sheet").value));
      if (d.error) { $("#ab-score").textContent = d.error; return; }
      const pct = v => (100 * v).toFixed(1) + "%", ci = c => c ? "[" + pct(c[0]) + ", " + pct(c[1]) + "]" : "";
      $("#ab-score").replaceChildren(h("p", {}, h("strong", {text: d.model_a}), " vs ", h("strong", {text: d.model_b}), " — " + d.votes + " votes"),
        table([{outcome: "A wins", n: d.win, rate: pct(d.win_rate), ci: ci(d.win_ci)}, {outcome: "ties", n: d.tie, rate: pct(d.tie_rate), ci: ci(d.tie_ci)},
               {outcome: "A loses", n: d.loss, rate: pct(d.loss_rate), ci: ci(d.loss_ci)},
               {outcome: "A's win rate (decisive votes)", n: d.win + d.loss, rate: d.a_win_rate_decisive === null ? "—" : pct(d.a_win_rate_decisive), ci: ci(d.a_win_rate_decisive_ci)}],
              [["outcome", "outcome"], ["n", "votes"], ["rate", "rate"], ["ci", "95% Wilson interval"]], "A/B score"));
    });
  }

  // ---------------------------------------------------------------- merge / export
  function pageExport() {
    (async () => {
      const targets = await api("/api/targets");
      $("#ex-run").replaceChildren(...targets.targets.filter(t => t.id.startsWith("run:")).map(t => h("option", {value: t.id.slice(4), text: t.id.slice(4)})));
      if (q.get("id")) $("#ex-run").value = q.get("id");
      const opts = await api("/api/export/options");
      $("#ex-quantize").replaceChildren(...opts.quantize.map(c => h("option", {value: c.value, text: c.label})));
    })();
    $("#ex-action").addEventListener("change", () => { $("#ex-quantize").disabled = $("#ex-action").value !== "export"; });
    $("#btn-export").addEventListener("click", async () => {
      const d = await api("/api/export", {id: $("#ex-run").value, action: $("#ex-action").value, quantize: $("#ex-quantize").value,
        name: $("#ex-name").value, force: $("#ex-force").checked});
      if (d.error) { flash(d.error, "error"); return; }
      jobBox($("#ex-job"), d.job, j => {
        if (!j.result || !j.result.report) return;
        const rows = Object.entries(j.result.report).filter(([, v]) => typeof v !== "object" || v === null).map(([k, v]) => ({figure: k, value: v}));
        $("#ex-job").append(h("h3", {text: "Parity figures (" + j.result.file + ")"}), table(rows, [["figure", "figure"], ["value", "value"]], "Parity figures"));
      });
    });
  }

  // ---------------------------------------------------------------- search studies
  function pageSearch() {
    poll(async () => {
      const d = await api("/api/studies");
      if (!d.studies || !d.studies.length) return;
      $("#studies").replaceChildren(...d.studies.map(s => h("section", {"aria-label": "Study " + s.id}, h("h2", {text: s.id}),
        h("p", {}, ...s.files.map(f => h("a", {href: "/study/file?id=" + encodeURIComponent(s.id) + "&name=" + f, text: f + " "})),
          s.best ? h("span", {}, " best trial: ", h("a", {href: "/run?id=" + encodeURIComponent(s.best), text: s.best})) : ""),
        table(s.trials, [[t => h("a", {href: "/run?id=" + encodeURIComponent(t.id), text: t.name}), "trial"], [t => badge(t.status), "status"],
          ["step", "step"], ["eval_loss", "eval loss"], ["last_loss", "last loss"]], "Trials"))));
    }, 5000);
  }

  // ---------------------------------------------------------------- jobs
  function pageJobs() {
    poll(async () => {
      const d = await api("/api/jobs");
      $("#jobs").replaceChildren(d.jobs.length ? table(d.jobs, [[j => h("a", {href: "/jobs?id=" + j.id, text: j.title}), "job"], [j => badge(j.state), "state"],
        [j => h("code", {text: j.command}), "command"], [j => ago(j.started), "started"],
        [j => j.alive ? h("button", {type: "button", "aria-label": "Stop job " + j.id, onclick: async () => { const r = await api("/api/job/stop", {id: j.id}); flash(r.error || "stop sent", r.error ? "error" : "info"); }}, "Stop") : "", "action"]], "Jobs")
        : h("p", {class: "muted", text: "none yet"}));
    }, 2000);
    if (q.get("id")) jobBox($("#job-detail"), {id: q.get("id"), command: ""});
  }

  const pages = {runs: pageRuns, run: pageRun, new: pageNew, chat: pageChat, compare: pageCompare, export: pageExport, search: pageSearch, jobs: pageJobs};
  const init = pages[document.body.dataset.page];
  if (init) init();
})();
