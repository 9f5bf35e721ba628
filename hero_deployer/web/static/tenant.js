// The tenant's "My VMs": the secret lives in localStorage and travels only in POST bodies.
"use strict";

(() => {
  const KEY = "hero-deployer.secret";
  const $ = (id) => document.getElementById(id);
  const ACTIONS = {
    running: ["stop", "restart", "delete"],
    stopped: ["start", "delete"],
    deploying: ["delete"],
    failed: ["delete"],
  };
  const LABELS = { start: "Start", stop: "Stop", restart: "Restart", delete: "Delete" };

  const getSecret = () => localStorage.getItem(KEY);
  const setSecret = (value) => localStorage.setItem(KEY, value);

  function generate() {
    const bytes = new Uint8Array(32);
    crypto.getRandomValues(bytes);
    return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  async function api(path, body) {
    let response;
    try {
      response = await fetch(path, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": HD.csrf() },
        body: JSON.stringify(body),
      });
    } catch (error) {
      return { ok: false, status: 0, error: { code: "Network", message: "The dashboard is not reachable." } };
    }
    let data = {};
    try { data = await response.json(); } catch (error) { data = {}; }
    if (response.ok) return { ok: true, status: response.status, data };
    const fallback = { code: String(response.status), message: `The request failed (${response.status}).` };
    return { ok: false, status: response.status, error: data.error || fallback };
  }

  function showError(message) {
    const el = $("tenant-error");
    el.textContent = message || "";
    el.hidden = !message;
  }

  function cell(text) {
    const td = document.createElement("td");
    td.textContent = text;
    return td;
  }

  function render(vms) {
    const body = $("vm-rows");
    body.replaceChildren();
    if (vms.length === 0) {
      const row = document.createElement("tr");
      row.className = "empty";
      const td = cell("No VMs for this secret yet. Deploy one below.");
      td.colSpan = 6;
      row.appendChild(td);
      body.appendChild(row);
      return;
    }
    for (const vm of vms) {
      const row = document.createElement("tr");
      row.dataset.sid = vm.sid;
      row.dataset.status = vm.status;
      const name = cell(vm.name);
      const sid = document.createElement("div");
      sid.className = "muted small";
      sid.textContent = vm.sid;
      name.appendChild(sid);
      row.appendChild(name);
      const status = document.createElement("td");
      const badge = document.createElement("span");
      badge.className = "badge " + vm.status;
      badge.textContent = vm.status;
      status.appendChild(badge);
      if (vm.error) {
        const error = document.createElement("div");
        error.className = "error small";
        error.textContent = vm.error;
        status.appendChild(error);
      }
      row.appendChild(status);
      row.appendChild(cell(vm.node_id === null ? "—" : String(vm.node_id)));
      row.appendChild(cell(`${vm.cpu_count} CPU · ${vm.memory_gb} GB · ${vm.disk_gb} GB disk`));
      const created = document.createElement("td");
      const time = document.createElement("time");
      time.setAttribute("datetime", vm.created_at);
      time.dataset.local = "";
      created.appendChild(time);
      row.appendChild(created);
      const actionsCell = document.createElement("td");
      const actions = document.createElement("div");
      actions.className = "buttons";
      actionsCell.appendChild(actions);
      for (const action of ACTIONS[vm.status] || []) {
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = LABELS[action];
        button.dataset.action = action;
        if (action === "delete") button.className = "danger";
        button.addEventListener("click", () => act(vm, action));
        actions.appendChild(button);
      }
      row.appendChild(actionsCell);
      body.appendChild(row);
    }
    HD.formatTimes(body);
  }

  let loading = false;
  let again = false;
  async function load() {
    const secret = getSecret();
    if (secret === null) return;
    if (loading) { again = true; return; }
    loading = true;
    try {
      do {
        again = false;
        const result = await api("/tenant/api/vms", { secret: getSecret() });
        if (!result.ok) { showError(result.error.message); return; }
        showError("");
        render(result.data.vms);
      } while (again);
    } finally {
      loading = false;
    }
  }

  async function act(vm, action) {
    if (action === "delete" && !(await HD.confirmDialog(`Delete ${vm.name}? This cannot be undone.`, "Yes, delete"))) return;
    const result = await api("/tenant/api/action", { secret: getSecret(), sid: vm.sid, action });
    if (!result.ok) showError(result.error.message);
    await load();
  }

  function openSetSecret() {
    $("set-secret-input").value = "";
    $("set-secret-dialog").showModal();
  }

  function setupSetSecret() {
    $("set-secret-generate").addEventListener("click", () => {
      const input = $("set-secret-input");
      input.value = generate();
      input.type = "text";
    });
    $("set-secret-form").addEventListener("submit", (event) => {
      event.preventDefault();
      setSecret($("set-secret-input").value);
      $("set-secret-dialog").close();
      load();
    });
    $("set-secret-dialog").addEventListener("cancel", (event) => {
      if (getSecret() === null) event.preventDefault();  // the page needs a secret to work
    });
  }

  function setupChangeSecret() {
    const dialog = $("change-secret-dialog");
    const error = $("change-secret-error");
    const fail = (message) => { error.textContent = message; error.hidden = false; };
    $("change-secret-open").addEventListener("click", () => {
      for (const id of ["current-secret", "new-secret", "confirm-secret"]) {
        $(id).value = "";
        $(id).type = "password";
      }
      error.hidden = true;
      dialog.showModal();
    });
    $("change-secret-cancel").addEventListener("click", () => dialog.close());
    $("change-secret-generate").addEventListener("click", () => {
      const value = generate();
      for (const id of ["new-secret", "confirm-secret"]) {
        $(id).value = value;
        $(id).type = "text";
      }
    });
    $("change-secret-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      error.hidden = true;
      const current = $("current-secret").value;
      const fresh = $("new-secret").value;
      if (fresh === "") return fail("The new secret must not be empty.");
      if (fresh !== $("confirm-secret").value) return fail("The new secret and its confirmation differ.");
      if (fresh === current) return fail("The new secret is the same as the current one.");
      $("change-secret-submit").disabled = true;
      try {
        const result = await api("/tenant/api/migrate", { old_secret: current, new_secret: fresh });
        if (result.ok) {
          setSecret(fresh);
          dialog.close();
          HD.toast(`✓ Secret updated — ${result.data.migrated_count} VMs migrated`);
          await load();
        } else if (result.error.code === "NotFound") {
          fail("Current secret is incorrect");
        } else {
          fail(result.error.message);
        }
      } finally {
        $("change-secret-submit").disabled = false;
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    setupSetSecret();
    setupChangeSecret();
    $("forget-secret").addEventListener("click", () => {
      localStorage.removeItem(KEY);
      render([]);
      openSetSecret();
    });
    $("deploy-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = $("vm-name").value.trim();
      const result = await api("/tenant/api/deploy", { secret: getSecret(), name });
      if (!result.ok) { showError(result.error.message); return; }
      $("vm-name").value = "";
      HD.toast(`Deploying ${name}…`);
      await load();
    });
    const after = document.body.dataset.liveAfter;
    const source = new EventSource(after ? "/tenant/live?after=" + encodeURIComponent(after) : "/tenant/live");
    source.onopen = () => { HD.liveState(true); load(); };
    source.onerror = () => HD.liveState(false);
    source.onmessage = () => load();
    window.addEventListener("pagehide", () => source.close());
    if (getSecret() === null) openSetSecret();
    else load();
  });
})();
