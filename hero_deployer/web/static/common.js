// Shared by every page: CSRF token, local times, confirmation dialogs, toasts.
"use strict";

const HD = (() => {
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

  function ago(date) {
    const seconds = Math.max(0, (Date.now() - date.getTime()) / 1000);
    if (seconds < 60) return "just now";
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h`;
    return `${Math.floor(seconds / 86400)} d`;
  }

  function formatTimes(root) {
    for (const el of root.querySelectorAll("time[data-local]")) {
      const date = new Date(el.getAttribute("datetime"));
      if (!isNaN(date)) el.textContent = date.toLocaleString();
    }
    for (const el of root.querySelectorAll("time[data-age]")) {
      const date = new Date(el.getAttribute("datetime"));
      if (!isNaN(date)) {
        el.textContent = ago(date);
        el.title = date.toLocaleString();
      }
    }
  }

  function toast(message, kind) {
    const el = document.getElementById("toast");
    el.textContent = message;
    el.className = "toast " + (kind || "ok");
    el.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { el.hidden = true; }, 8000);
  }

  // Resolves true when the person confirms `message` in the page's dialog.
  function confirmDialog(message, okLabel) {
    const dialog = document.getElementById("confirm-dialog");
    document.getElementById("confirm-text").textContent = message;
    document.getElementById("confirm-ok").textContent = okLabel || "Yes";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  function liveState(connected) {
    const dot = document.getElementById("live-dot");
    if (dot) dot.hidden = !connected;
  }

  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) return;
    event.preventDefault();
    if (await confirmDialog(form.dataset.confirm, "Yes, continue")) form.submit();
  });

  document.addEventListener("DOMContentLoaded", () => {
    formatTimes(document);
    setInterval(() => formatTimes(document), 30000);
  });

  return { csrf, formatTimes, toast, confirmDialog, liveState };
})();
