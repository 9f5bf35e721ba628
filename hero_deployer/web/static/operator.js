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
          if (page === "audit") markFresh();
          updates += 1;
          document.body.dataset.liveUpdates = String(updates);
        } while (again);
      } finally {
        running = false;
      }
    };
  }

  // The audit page's live tail: new events matching the filters reload the newest page's rows
  // from the server (which knows each command's actor); rows newer than the page are marked.
  let baseline = null;  // the newest position the page showed when it loaded
  function markFresh() {
    const rows = document.querySelectorAll("#audit-rows tr[data-position]");
    const positions = Array.from(rows, (row) => Number(row.dataset.position));
    if (baseline === null) baseline = Math.max(0, ...positions);
    rows.forEach((row, index) => row.classList.toggle("fresh", positions[index] > baseline));
  }

  function auditEvent(event, refresh) {
    const table = document.querySelector("table.audit");
    const tail = document.getElementById("live-tail");
    if (!table || !tail || !tail.checked || !refresh) return;
    if (table.dataset.stream && table.dataset.stream !== event.stream) return;
    if (table.dataset.type && table.dataset.type !== event.type) return;
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const target = document.querySelector("[data-refresh]");
    const refresh = target ? refresher(target) : null;
    if (page === "audit") markFresh();
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
      if (page === "audit") auditEvent(event, refresh);
      else if (page === "users" && event.stream.startsWith("user:")) refresh();
      else if (page === "user" && event.stream === wanted) refresh();
    };
    window.addEventListener("pagehide", () => source.close());
  });
})();
