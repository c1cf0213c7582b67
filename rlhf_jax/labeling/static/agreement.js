// The agreement view: renders /api/agreement into tables (textContent only).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

  function row(cells) {
    const tr = document.createElement("tr");
    cells.forEach((c, i) => {
      const td = document.createElement("td");
      td.textContent = String(c);
      if (i < 2 && typeof c === "string") td.className = "name";
      tr.append(td);
    });
    return tr;
  }

  async function load() {
    const cfg = await (await fetch("/api/config", { cache: "no-store" })).json();
    const headers = {};
    if (cfg.auth === "token") {
      const t = localStorage.getItem("labeling.token");
      if (t) headers.Authorization = "Bearer " + t;
    } else {
      const n = localStorage.getItem("labeling.name");
      if (n) headers["X-Labeler"] = n;
    }
    const r = await fetch("/api/agreement", { headers, cache: "no-store" });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) {
      $("status").textContent = (data.detail || r.statusText) + " (open the ranking page first)";
      $("status").className = "status error";
      return;
    }
    const lab = $("labelers").tBodies[0];
    lab.replaceChildren(...data.labelers.map((l) => row([l.labeler, l.rankings, l.skips,
      l.gold_items, fmt(l.gold_mean_tau_b), fmt(l.gold_pair_agreement)])));
    const pairs = $("pairs").tBodies[0];
    pairs.replaceChildren(...data.pairs.map((p) => row([p.a, p.b, p.shared_items, p.tau_items,
      fmt(p.mean_tau_b), fmt(p.exact_agreement)])));
    if (!data.pairs.length) {
      pairs.replaceChildren(row(["no item ranked by two labelers yet", "", "", "", "", ""]));
    }
    $("overall").textContent = data.items.ranked + " items ranked, " +
      data.items.multiply_ranked + " by more than one labeler; gold τ-b over " + data.gold.items +
      " rankings: " + fmt(data.gold.mean_tau_b) + ", gold pair agreement: " +
      fmt(data.gold.pair_agreement) + ".";
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
    $("status").className = "status ok";
  }

  window.addEventListener("DOMContentLoaded", () => {
    $("reload").addEventListener("click", () => load().catch((e) => {
      $("status").textContent = e.message;
    }));
    load().catch((e) => { $("status").textContent = e.message; });
  });
})();
