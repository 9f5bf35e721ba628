// Operator pages: live updates from /live (server-sent events) refresh what the page shows.
"use strict";

(() => {
  const page = document.body.dataset.page;
  let updates = 0;

  // Re-renders `el` from its data-refresh URL; coalesces refreshes asked for meanwhile.
  function refresher(el) {
    let running = false;
    let again = false;
    return async function refresh() {
      if (running) { again = true; return; }
      running = true;
      try {
        do {
          again = false;
          const response = await fetch(el.dataset.refresh, { credentials: "same-origin" });
          if (response.status === 401) { location.assign("/login?next=" + encodeURIComponent(location.pathname)); return; }
          if (!response.ok) return;
          el.innerHTML = await response.text();  // server-rendered, escaped by Jinja
          HD.formatTimes(el);
          updates += 1;
          document.body.dataset.liveUpdates = String(updates);
        } while (again);
      } finally {
        running = false;
      }
    };
  }

  let newest = 0;
  function auditRow(event) {
    if (event.position <= newest) return;  // already shown
    newest = event.position;
    const table = document.querySelector("table.audit");
    const tail = document.getElementById("live-tail");
    if (!table || !tail || !tail.checked) return;
    if (table.dataset.stream && table.dataset.stream !== event.stream) return;
    if (table.dataset.type && table.dataset.type !== event.type) return;
    const body = document.getElementById("audit-rows");
    const empty = body.querySelector("tr.empty");
    if (empty) empty.remove();
    const row = document.createElement("tr");
    row.className = "fresh";
    const cells = [String(event.position), null, event.stream, event.type, JSON.stringify(event.data)];
    cells.forEach((text, index) => {
      const cell = document.createElement("td");
      if (index === 1) {
        const time = document.createElement("time");
        time.setAttribute("datetime", event.recorded_at);
        time.dataset.local = "";
        time.textContent = event.recorded_at;
        cell.appendChild(time);
      } else if (index === 4) {
        const code = document.createElement("code");
        code.className = "data";
        code.textContent = text;
        cell.appendChild(code);
      } else {
        cell.textContent = text;
      }
      row.appendChild(cell);
    });
    body.prepend(row);
    HD.formatTimes(row);
    updates += 1;
    document.body.dataset.liveUpdates = String(updates);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const target = document.querySelector("[data-refresh]");
    const refresh = target ? refresher(target) : null;
    for (const cell of document.querySelectorAll("#audit-rows td:first-child")) {
      newest = Math.max(newest, Number(cell.textContent) || 0);
    }
    const detail = document.getElementById("user-detail");
    const wanted = detail ? "user:" + detail.dataset.user : null;
    const after = document.body.dataset.liveAfter;
    const source = new EventSource(after ? "/live?after=" + encodeURIComponent(after) : "/live");
    let opened = false;
    source.onopen = () => {
      HD.liveState(true);
      if (opened && refresh && !after) refresh();  // a reconnect without a position: catch up
      opened = true;
    };
    source.onerror = () => HD.liveState(false);
    source.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (page === "audit") auditRow(event);
      else if (page === "users" && event.stream.startsWith("user:")) refresh();
      else if (page === "user" && event.stream === wanted) refresh();
    };
    window.addEventListener("pagehide", () => source.close());
  });
})();
