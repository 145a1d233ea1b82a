// Federation page: per-round loss/accuracy and cumulative epsilon, refreshed while a round runs.
(function () {
  "use strict";
  const root = document.getElementById("federation");
  if (!root) return;
  const url = root.dataset.roundsUrl;
  function width(el) { return Math.max(260, el.clientWidth || 400); }
  function chart(el, series) {
    return new uPlot({
      width: width(el), height: 200, scales: { x: { time: false } },
      axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100] }, {}], series: [{ label: "round" }].concat(series),
    }, [[]].concat(series.map(function () { return []; })), el);
  }
  const roundsEl = document.getElementById("chart-rounds");
  const epsEl = document.getElementById("chart-epsilon");
  const metrics = chart(roundsEl, [
    { label: "train loss", stroke: "#1f5fae", width: 2 },
    { label: "val loss", stroke: "#b3261e", width: 2 },
    { label: "accuracy", stroke: "#1d7a46", width: 2 },
  ]);
  const eps = chart(epsEl, [{ label: "ε", stroke: "#5a2ca0", width: 2 }]);
  async function poll() {
    let busy = false;
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" } });
      if (response.ok) {
        const data = await response.json();
        const done = data.rounds.filter(function (r) { return r.status === "succeeded"; });
        const x = done.map(function (r) { return r.number; });
        const pick = function (k) { return done.map(function (r) { return r[k]; }); };
        metrics.setData([x, pick("train_loss"), pick("val_loss"), pick("accuracy")]);
        eps.setData([x, pick("epsilon")]);
        root.dataset.rounds = String(done.length);
        busy = data.busy;
        // A round started or ended since the page was rendered: reload for the table.
        const now = data.rounds.slice().reverse().slice(0, 100).map(function (r) {
          return r.number + ":" + r.status + ";";
        }).join("");
        if (now !== root.dataset.rendered) { window.location.reload(); return; }
      }
    } catch (e) { /* transient */ }
    window.setTimeout(poll, busy ? 2000 : 10000);
  }
  poll();
})();
