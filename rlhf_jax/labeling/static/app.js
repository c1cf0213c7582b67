// The ranking page. Plain JavaScript, no build step. Text that comes from the data (prompts,
// responses, ids, names, messages) is only ever inserted with textContent, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const NAME_RE = /^[A-Za-z0-9_.@-]{1,64}$/;
  const S = {
    cfg: null, labeler: null, token: null,
    item: null,   // the item shown: {item, id, split, prompt, responses, k, draft}
    rows: [],     // rows[d] = rank row of response d (0 = best), -1 = unranked
    hist: [],     // responses in the order they were placed (for Backspace and Shift+n)
    sid: null,    // submission id of this item's ranking (reused when retrying)
    last: null,   // {submission_id, item, id} of the labeler's latest ranking
    busy: false,
  };

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function newSid() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function setStatus(text, kind) {
    const s = $("status");
    s.textContent = text || "";
    s.className = "status" + (kind ? " " + kind : "");
  }

  function authHeaders() {
    return S.cfg.auth === "token" ? { Authorization: "Bearer " + S.token }
      : { "X-Labeler": S.labeler };
  }

  // One API call. Network failures and 5xx are retried `retries` times (same body, so a
  // submission keeps its id); other errors raise ApiError with the server's explanation.
  async function api(method, path, body, retries = 0) {
    for (let attempt = 0; ; attempt++) {
      let r;
      try {
        const headers = authHeaders();
        if (body) headers["Content-Type"] = "application/json";
        r = await fetch(path, { method, headers, cache: "no-store",
          body: body ? JSON.stringify(body) : undefined });
      } catch (e) {
        if (attempt < retries) {
          setStatus("Cannot reach the server; retrying…", "warn");
          await sleep(Math.min(4000, 300 * 2 ** attempt));
          continue;
        }
        throw new ApiError(0, "Cannot reach the server. Your work on this item is kept; " +
          "try again in a moment.");
      }
      if (r.status >= 500 && attempt < retries) {
        await sleep(Math.min(4000, 300 * 2 ** attempt));
        continue;
      }
      let data = null;
      try { data = await r.json(); } catch (e) { data = null; }
      if (!r.ok) throw new ApiError(r.status, (data && data.detail) || r.statusText);
      return data;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Drafts: the placement of the current item survives a reload (localStorage).

  const draftPrefix = () => "labeling.draft." + (S.cfg.auth === "token" ? "t:" + S.token.slice(0, 8)
    : S.labeler) + ".";
  const draftKey = (item) => draftPrefix() + item;

  function saveDraft() {
    if (!S.item) return;
    try {
      localStorage.setItem(draftKey(S.item.item),
        JSON.stringify({ rows: S.rows, hist: S.hist, sid: S.sid }));
    } catch (e) { /* storage full or disabled: the draft is just not kept */ }
  }

  function forgetOtherDrafts(keep) {
    const prefix = draftPrefix();
    for (let i = localStorage.length - 1; i >= 0; i--) {
      const k = localStorage.key(i);
      if (k && k.startsWith(prefix) && k !== draftKey(keep)) localStorage.removeItem(k);
    }
  }

  function loadDraft(item) {
    try {
      const d = JSON.parse(localStorage.getItem(draftKey(item.item)) || "null");
      if (d && Array.isArray(d.rows) && d.rows.length === item.k &&
          d.rows.every((r) => Number.isInteger(r) && r >= -1 && r < item.k)) return d;
    } catch (e) { /* a corrupt draft is ignored */ }
    return null;
  }

  // ---------------------------------------------------------------------------------------
  // State from the server.

  function applyState(st) {
    S.last = st.last;
    $("undo").disabled = !S.last;
    $("done-undo").disabled = !S.last;
    const p = st.progress;
    $("labeler-name").textContent = p.labeler;
    $("progress").max = Math.max(1, p.target_rankings);
    $("progress").value = p.rankings;
    $("progress-text").textContent = p.rankings + " / " + p.target_rankings +
      " rankings · " + p.items_complete + " / " + p.items + " prompts done";
    $("my-count").textContent = "You: " + p.mine + " ranked" +
      (p.my_skips ? ", " + p.my_skips + " skipped" : "");
    const it = st.item;
    $("login").hidden = true;
    if (!it) {
      S.item = null;
      $("work").hidden = true;
      $("done").hidden = false;
      return;
    }
    $("done").hidden = true;
    $("work").hidden = false;
    if (!S.item || S.item.item !== it.item) {
      S.item = it;
      const d = loadDraft(it);
      if (d) {
        S.rows = d.rows; S.hist = Array.isArray(d.hist) ? d.hist : []; S.sid = d.sid || newSid();
      } else if (Array.isArray(it.draft) && it.draft.length === it.k) {
        S.rows = it.draft.slice(); S.hist = []; S.sid = newSid();
      } else {
        S.rows = new Array(it.k).fill(-1); S.hist = []; S.sid = newSid();
      }
      forgetOtherDrafts(it.item);
      saveDraft();
    }
    render();
  }

  async function refresh() {
    applyState(await api("GET", "/api/next", null, 3));
  }

  // ---------------------------------------------------------------------------------------
  // Rendering.

  const ORD = ["1st", "2nd", "3rd"];
  const ordinal = (r) => (r < 3 ? ORD[r] : (r + 1) + "th");

  function denseRanks() {
    const used = [...new Set(S.rows.filter((r) => r >= 0))].sort((a, b) => a - b);
    return S.rows.map((r) => (r >= 0 ? used.indexOf(r) : -1));
  }

  function render() {
    const it = S.item;
    $("prompt").textContent = it.prompt;
    $("item-id").textContent = "(" + it.split + " · " + it.id + ")";
    const pool = $("pool");
    const tiers = $("tiers");
    pool.replaceChildren();
    tiers.replaceChildren();
    const rowCards = [];
    for (let r = 0; r < it.k; r++) {
      const li = el("li", "tier zone");
      li.dataset.row = String(r);
      const label = el("div", "tier-label", ordinal(r) + (r === 0 ? " (best)" : ""));
      const cards = el("div", "tier-cards");
      li.append(label, cards);
      tiers.append(li);
      rowCards.push([li, label, cards]);
    }
    const dense = denseRanks();
    for (let d = 0; d < it.k; d++) {
      const card = el("div", "card");
      card.dataset.d = String(d);
      card.tabIndex = 0;
      card.setAttribute("aria-label", "response " + (d + 1));
      card.append(el("span", "badge", String(d + 1)), el("div", "text", it.responses[d]));
      if (S.rows[d] >= 0) {
        card.append(el("span", "rank", "rank " + (dense[d] + 1)));
        rowCards[S.rows[d]][2].append(card);
      } else {
        pool.append(card);
      }
    }
    for (const [li, label, cards] of rowCards) {
      if (cards.children.length > 1) {
        li.classList.add("tie");
        label.textContent += " · tie";
      }
    }
    $("submit").disabled = !complete();
  }

  const complete = () => S.item && S.rows.every((r) => r >= 0);

  function changed() {
    saveDraft();
    render();
    setStatus("");
  }

  // ---------------------------------------------------------------------------------------
  // Placing responses.

  function compact() {
    const used = [...new Set(S.rows.filter((r) => r >= 0))].sort((a, b) => a - b);
    S.rows = S.rows.map((r) => (r >= 0 ? used.indexOf(r) : -1));
  }

  // Keyboard: response d goes to the row below everything placed, or (tie) to the row of the
  // response placed last.
  function place(d, tie) {
    const others = S.rows.filter((r, i) => r >= 0 && i !== d);
    let target;
    if (tie) {
      const prev = [...S.hist].reverse().find((i) => i !== d && S.rows[i] >= 0);
      target = prev !== undefined ? S.rows[prev] : (others.length ? Math.max(...others) : 0);
    } else {
      target = others.length ? Math.max(...others) + 1 : 0;
      if (target >= S.item.k) {
        S.rows[d] = -1;
        compact();
        const again = S.rows.filter((r, i) => r >= 0 && i !== d);
        target = again.length ? Math.max(...again) + 1 : 0;
      }
    }
    S.rows[d] = target;
    S.hist = S.hist.filter((i) => i !== d).concat([d]);
    changed();
  }

  function takeBack() {
    while (S.hist.length) {
      const d = S.hist.pop();
      if (S.rows[d] >= 0) { S.rows[d] = -1; changed(); return; }
    }
    const placed = S.rows.map((r, d) => [r, d]).filter(([r]) => r >= 0);
    if (placed.length) {
      placed.sort((a, b) => b[0] - a[0] || b[1] - a[1]);
      S.rows[placed[0][1]] = -1;
      changed();
    }
  }

  function clearAll() {
    S.rows = new Array(S.item.k).fill(-1);
    S.hist = [];
    changed();
  }

  // Mouse/touch: pointer-event drag and drop (works the same for mouse, pen and touch).
  let drag = null;

  function zoneAt(x, y) {
    const hit = document.elementFromPoint(x, y);
    return hit ? hit.closest(".zone") : null;
  }

  function onPointerDown(e) {
    if (e.button !== 0 || S.busy || !S.item) return;
    const card = e.target.closest(".card");
    if (!card) return;
    drag = { card, d: Number(card.dataset.d), x0: e.clientX, y0: e.clientY, id: e.pointerId,
      ghost: null, over: null, dx: 0, dy: 0 };
    card.setPointerCapture(e.pointerId);
  }

  function onPointerMove(e) {
    if (!drag || e.pointerId !== drag.id) return;
    if (!drag.ghost) {
      if (Math.hypot(e.clientX - drag.x0, e.clientY - drag.y0) < 5) return;
      const box = drag.card.getBoundingClientRect();
      drag.ghost = drag.card.cloneNode(true);
      drag.ghost.classList.add("ghost");
      drag.ghost.style.width = box.width + "px";
      drag.dx = drag.x0 - box.left;
      drag.dy = drag.y0 - box.top;
      document.body.append(drag.ghost);
      drag.card.classList.add("dragging");
    }
    drag.ghost.style.left = (e.clientX - drag.dx) + "px";
    drag.ghost.style.top = (e.clientY - drag.dy) + "px";
    const zone = zoneAt(e.clientX, e.clientY);
    if (zone !== drag.over) {
      if (drag.over) drag.over.classList.remove("over");
      if (zone) zone.classList.add("over");
      drag.over = zone;
    }
  }

  function endDrag(e, drop) {
    if (!drag || e.pointerId !== drag.id) return;
    const d = drag;
    drag = null;
    if (d.over) d.over.classList.remove("over");
    d.card.classList.remove("dragging");
    if (!d.ghost) return;
    d.ghost.remove();
    const zone = drop ? zoneAt(e.clientX, e.clientY) : null;
    if (!zone) return;
    if (zone.dataset.row === undefined) {
      S.rows[d.d] = -1;
      S.hist = S.hist.filter((i) => i !== d.d);
    } else {
      S.rows[d.d] = Number(zone.dataset.row);
      S.hist = S.hist.filter((i) => i !== d.d).concat([d.d]);
    }
    changed();
  }

  // ---------------------------------------------------------------------------------------
  // Actions.

  async function submit() {
    if (!S.item || S.busy) return;
    if (!complete()) {
      const left = S.rows.map((r, d) => (r < 0 ? d + 1 : 0)).filter(Boolean);
      setStatus("Place every response first (unranked: " + left.join(", ") + ").", "warn");
      return;
    }
    S.busy = true;
    const item = S.item.item;
    try {
      const res = await api("POST", "/api/submit",
        { item, ranks: denseRanks(), submission_id: S.sid }, 4);
      localStorage.removeItem(draftKey(item));
      setStatus(res.result.duplicate ? "Saved (it had already arrived)." : "Saved.", "ok");
      applyState(res.state);
    } catch (err) {
      await handleError(err);
    } finally {
      S.busy = false;
    }
  }

  async function skip() {
    if (!S.item || S.busy) return;
    S.busy = true;
    const item = S.item.item;
    try {
      const res = await api("POST", "/api/skip", { item }, 4);
      localStorage.removeItem(draftKey(item));
      setStatus("Skipped.", "ok");
      applyState(res.state);
    } catch (err) {
      await handleError(err);
    } finally {
      S.busy = false;
    }
  }

  async function undo() {
    if (!S.last || S.busy) return;
    S.busy = true;
    try {
      const res = await api("POST", "/api/undo", { submission_id: S.last.submission_id }, 2);
      setStatus("Your last ranking is back: change it and submit again.", "ok");
      S.item = null;  // the undone item replaces the one shown, pre-filled
      applyState(res.state);
    } catch (err) {
      await handleError(err);
    } finally {
      S.busy = false;
    }
  }

  async function handleError(err) {
    const status = err instanceof ApiError ? err.status : 0;
    setStatus(err.message, status === 409 || status === 0 ? "warn" : "error");
    if (status === 401) { showLogin(); return; }
    if (status === 409 || status === 404) {
      const msg = err.message;
      try { await refresh(); } catch (e) { /* keep the message below */ }
      setStatus(msg, "warn");
    }
  }

  function onKey(e) {
    if (!S.item || S.busy || $("work").hidden) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA")) return;
    if (t && t.tagName === "BUTTON" && (e.key === "Enter" || e.key === " ")) return;
    const m = /^(?:Digit|Numpad)([1-9])$/.exec(e.code || "");
    const n = m ? Number(m[1]) : (/^[1-9]$/.test(e.key) ? Number(e.key) : 0);
    if (n) {
      if (n <= S.item.k) place(n - 1, e.shiftKey);
      e.preventDefault();
      return;
    }
    const actions = { Backspace: takeBack, Escape: clearAll, Enter: submit, s: skip, S: skip,
      u: undo, U: undo };
    const fn = actions[e.key];
    if (fn) {
      e.preventDefault();
      fn();
    }
  }

  // ---------------------------------------------------------------------------------------
  // Who is labeling.

  function showLogin() {
    $("work").hidden = true;
    $("done").hidden = true;
    $("login").hidden = false;
    const byToken = S.cfg.auth === "token";
    $("name-form").hidden = byToken;
    $("token-missing").hidden = !byToken;
    $("change-name").hidden = byToken;
    if (!byToken) $("name-input").focus();
  }

  async function boot() {
    S.cfg = await (await fetch("/api/config", { cache: "no-store" })).json();
    $("name-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const name = $("name-input").value.trim();
      if (!NAME_RE.test(name)) {
        setStatus("Use 1-64 letters, digits or _ . @ -", "error");
        return;
      }
      localStorage.setItem("labeling.name", name);
      S.labeler = name;
      S.item = null;
      $("change-name").hidden = false;
      await refresh().catch(handleError);
    });
    $("change-name").addEventListener("click", () => {
      localStorage.removeItem("labeling.name");
      S.labeler = null;
      S.item = null;
      showLogin();
    });
    $("submit").addEventListener("click", submit);
    $("skip").addEventListener("click", skip);
    $("undo").addEventListener("click", undo);
    $("done-undo").addEventListener("click", undo);
    document.addEventListener("keydown", onKey);
    document.addEventListener("pointerdown", onPointerDown);
    document.addEventListener("pointermove", onPointerMove);
    document.addEventListener("pointerup", (e) => endDrag(e, true));
    document.addEventListener("pointercancel", (e) => endDrag(e, false));

    if (S.cfg.auth === "token") {
      const url = new URL(location.href);
      const t = url.searchParams.get("token");
      if (t) {
        localStorage.setItem("labeling.token", t);
        url.searchParams.delete("token");
        history.replaceState(null, "", url.pathname + url.search + url.hash);
      }
      S.token = localStorage.getItem("labeling.token");
      if (!S.token) { showLogin(); return; }
    } else {
      S.labeler = localStorage.getItem("labeling.name");
      if (!S.labeler || !NAME_RE.test(S.labeler)) { showLogin(); return; }
      $("change-name").hidden = false;
    }
    await refresh().catch(handleError);
  }

  window.addEventListener("DOMContentLoaded", () => {
    boot().catch((e) => setStatus("Could not start: " + e.message, "error"));
  });
})();
