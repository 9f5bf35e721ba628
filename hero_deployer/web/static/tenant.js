// The tenant's "My VMs" and one VM's page: the secret lives in localStorage and travels only in
// POST bodies.
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
  // Each action's label and tooltip, from the registry's row (tenant.py BUTTONS)
  const BUTTONS = JSON.parse(document.currentScript.dataset.buttons);

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

  function cell(text, label) {
    const td = document.createElement("td");
    td.textContent = text;
    td.dataset.label = label;
    return td;
  }

  const size = (vm) => `${vm.cpu_count} CPU · ${vm.memory_gb} GB · ${vm.disk_gb} GB disk · ${vm.rootfs_gb} GB root`;

  function badge(status) {
    const el = document.createElement("span");
    el.className = "badge " + status;
    el.textContent = status;
    return el;
  }

  function actionButtons(vm, container, after) {
    container.replaceChildren();
    for (const action of ACTIONS[vm.status] || []) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = BUTTONS[action].label;
      button.title = BUTTONS[action].title;
      button.dataset.action = action;
      if (action === "delete") button.className = "danger";
      button.addEventListener("click", () => act(vm, action, after));
      container.appendChild(button);
    }
  }

  function render(vms) {
    const body = $("vm-rows");
    body.replaceChildren();
    if (vms.length === 0) {
      const row = document.createElement("tr");
      row.className = "empty";
      const td = cell("No VMs for this secret yet. Deploy one below.", "");
      td.colSpan = 6;
      row.appendChild(td);
      body.appendChild(row);
      return;
    }
    for (const vm of vms) {
      const row = document.createElement("tr");
      row.dataset.sid = vm.sid;
      row.dataset.status = vm.status;
      const name = document.createElement("td");
      name.dataset.label = "Name";
      const link = document.createElement("a");
      link.href = "/tenant/vms/" + encodeURIComponent(vm.sid);
      link.textContent = vm.name;
      name.appendChild(link);
      const sid = document.createElement("div");
      sid.className = "muted small";
      sid.textContent = vm.sid;
      name.appendChild(sid);
      row.appendChild(name);
      const status = document.createElement("td");
      status.dataset.label = "Status";
      status.appendChild(badge(vm.status));
      if (vm.error) {
        const error = document.createElement("div");
        error.className = "error small";
        error.textContent = vm.error;
        status.appendChild(error);
      }
      row.appendChild(status);
      const address = cell(vm.mycelium_ip || "—", "Address");
      address.className = "url";
      row.appendChild(address);
      row.appendChild(cell(size(vm), "Size"));
      const created = document.createElement("td");
      created.dataset.label = "Created";
      const time = document.createElement("time");
      time.setAttribute("datetime", vm.created_at);
      time.dataset.local = "";
      created.appendChild(time);
      row.appendChild(created);
      const actionsCell = document.createElement("td");
      actionsCell.dataset.label = "Actions";
      const actions = document.createElement("div");
      actions.className = "buttons";
      actionsCell.appendChild(actions);
      actionButtons(vm, actions, load);
      row.appendChild(actionsCell);
      body.appendChild(row);
    }
    HD.formatTimes(body);
  }

  // One VM's page: how to reach it, its details, its actions.
  function renderVm(vm) {
    $("vm-title").textContent = vm.name;
    const status = $("vm-status");
    status.className = "badge " + vm.status;
    status.textContent = vm.status;
    $("vm-address").textContent = vm.mycelium_ip && vm.ssh_command ? vm.mycelium_ip : "—";
    $("vm-ssh").textContent = vm.ssh_command || (vm.status === "deleted" ? "— (deleted)" : "— (no address yet)");
    $("vm-image").textContent = vm.image;
    $("vm-size").textContent = size(vm);
    $("vm-node").textContent = vm.node_id === null ? "—" : String(vm.node_id);
    const created = $("vm-created");
    created.setAttribute("datetime", vm.created_at);
    HD.formatTimes(document);
    if (vm.error) showError(vm.error);
    document.body.dataset.vmStatus = vm.status;
    actionButtons(vm, $("vm-actions"), load);
  }

  // Loads what the page shows; calls asked for meanwhile are coalesced into one more.
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
        const page = $("vm-page");
        const result = page
          ? await api("/tenant/api/vm", { secret: getSecret(), sid: page.dataset.sid })
          : await api("/tenant/api/vms", { secret: getSecret() });
        if (!result.ok) { showError(result.error.message); return; }
        showError("");
        if (page) renderVm(result.data);
        else render(result.data.vms);
      } while (again);
    } finally {
      loading = false;
    }
  }

  async function act(vm, action, after) {
    if (action === "delete" && !(await HD.confirmDialog(`Delete ${vm.name}? This cannot be undone.`, "Yes, delete"))) return;
    const result = await api("/tenant/api/action", { secret: getSecret(), sid: vm.sid, action });
    if (!result.ok) showError(result.error.message);
    await after();
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
    if (!$("change-secret-open")) return;  // only the list page changes the secret
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
    if ($("forget-secret")) {
      $("forget-secret").addEventListener("click", () => {
        localStorage.removeItem(KEY);
        render([]);
        openSetSecret();
      });
    }
    if ($("deploy-form")) $("deploy-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = $("vm-name").value.trim();
      const body = { secret: getSecret(), name };
      for (const input of document.querySelectorAll("#deploy-form input[data-size]")) {
        body[input.name] = Number(input.value);
      }
      const result = await api("/tenant/api/deploy", body);
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
