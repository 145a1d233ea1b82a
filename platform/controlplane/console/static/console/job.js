// Job page: poll progress.json and grow the loss and accuracy charts while the job runs.
(function () {
  "use strict";
  const root = document.getElementById("job");
  if (!root) return;
  const url = root.dataset.progressUrl;
  const POLL_MS = 1500;
  const steps = [], loss = [], valLoss = [], acc = [];
  let after = 0;
  let lastEventId = null;
  let terminal = false;

  function width(el) { return Math.max(260, el.clientWidth || 400); }
  function makeChart(el, series) {
    const opts = {
      width: width(el), height: 220,
      scales: { x: { time: false } },
      axes: [{ label: "step", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] }, {}],
      series: [{ label: "step" }].concat(series),
    };
    return new uPlot(opts, [[]].concat(series.map(function () { return []; })), el);
  }
  const lossEl = document.getElementById("chart-loss");
  const accEl = document.getElementById("chart-acc");
  const lossChart = makeChart(lossEl, [
    { label: "loss", stroke: "#1f5fae", width: 2 },
    { label: "val loss", stroke: "#b3261e", width: 2, dash: [6, 4] },
  ]);
  const accChart = makeChart(accEl, [{ label: "token accuracy", stroke: "#1d7a46", width: 2 }]);
  window.addEventListener("resize", function () {
    lossChart.setSize({ width: width(lossEl), height: 220 });
    accChart.setSize({ width: width(accEl), height: 220 });
  });

  function text(tag, value, cls) {
    const el = document.createElement(tag);
    el.textContent = value;
    if (cls) el.className = cls;
    return el;
  }

  function render(data) {
    data.points.forEach(function (p) {
      after = Math.max(after, p.id);
      if (p.step === null || p.step === undefined) return;
      steps.push(p.step);
      loss.push(p.loss);
      valLoss.push(p.val_loss === undefined ? null : p.val_loss);
      acc.push(p.token_accuracy === undefined ? null : p.token_accuracy);
    });
    if (data.points.length) {
      lossChart.setData([steps, loss, valLoss]);
      accChart.setData([steps, acc]);
    }
    const points = document.getElementById("chart-points");
    points.textContent = steps.length + " point" + (steps.length === 1 ? "" : "s");
    points.dataset.count = String(steps.length);
    const status = document.getElementById("job-status");
    status.textContent = data.status;
    status.className = "badge status-" + data.status;
    document.getElementById("job-tokens").textContent = data.trained_tokens === null ? "—" : data.trained_tokens;
    if (data.fine_tuned_model) {
      const model = document.getElementById("job-model");
      model.replaceChildren(text("code", data.fine_tuned_model));
    }
    const top = data.events.length ? data.events[0].id : null;
    if (top !== lastEventId) {
      lastEventId = top;
      const list = document.getElementById("events");
      list.replaceChildren.apply(list, data.events.map(function (e) {
        const li = text("li", "", "level-" + e.level);
        li.appendChild(text("time", new Date(e.created_at).toISOString().slice(11, 19)));
        li.appendChild(document.createTextNode(" " + e.message));
        return li;
      }));
      const ckpts = document.getElementById("checkpoints");
      ckpts.replaceChildren.apply(ckpts, data.checkpoints.length ? data.checkpoints.map(function (c) {
        const li = text("li", "");
        li.appendChild(text("code", c.id));
        li.appendChild(document.createTextNode(" step " + c.step));
        return li;
      }) : [text("li", "None yet.", "muted")]);
    }
    terminal = data.terminal;
    document.querySelectorAll("#job-actions button").forEach(function (b) {
      const a = b.dataset.action;
      b.disabled = terminal || (a === "resume" && data.status !== "paused") ||
        (a === "pause" && !["queued", "running"].includes(data.status));
    });
  }

  async function poll() {
    try {
      const response = await fetch(url + "?after=" + after, { headers: { Accept: "application/json" } });
      if (response.ok) render(await response.json());
    } catch (e) { /* transient: try again */ }
    if (!terminal) window.setTimeout(poll, POLL_MS);
  }
  poll();
})();
