// pgoutbox console: the little that needs a script. Pages work without it.
"use strict";

// Overview: reload every 5 s while the box is ticked (remembered in this browser).
(function autoRefresh() {
  const box = document.getElementById("auto-refresh");
  if (!box) return;
  box.checked = localStorage.getItem("pgoutbox.refresh") === "1";
  let timer = null;
  const arm = () => {
    clearTimeout(timer);
    if (box.checked) timer = setTimeout(() => location.reload(), 5000);
  };
  box.addEventListener("change", () => {
    localStorage.setItem("pgoutbox.refresh", box.checked ? "1" : "0");
    arm();
  });
  arm();
})();

// Audit: start verify without leaving the page and show its progress.
(function verifyProgress() {
  const form = document.getElementById("verify-form");
  const status = document.getElementById("verify-status");
  const bar = document.getElementById("verify-progress");
  if (!form || !status) return;
  const show = (v) => {
    bar.max = Math.max(v.total, v.rows, 1);
    bar.value = v.rows;
    if (v.running) status.textContent = `verifying: ${v.rows} of ${v.total} rows…`;
    else if (v.error) status.textContent = `verify could not run: ${v.error}`;
    else if (v.ok === true) status.textContent =
      `OK: ${v.rows} rows of ${v.operations} operations, every hash chain holds`;
    else if (v.ok === false) status.textContent = `FAILED: ${v.failures.join("; ")}`;
  };
  const poll = async () => {
    const response = await fetch(status.dataset.statusUrl, { credentials: "same-origin" });
    const v = await response.json();
    show(v);
    if (v.running) setTimeout(poll, 500);
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const response = await fetch(form.action, {
      method: "POST",
      credentials: "same-origin",
      headers: { Accept: "application/json" },
      body: new URLSearchParams(new FormData(form)),
    });
    if (!response.ok) { status.textContent = await response.text(); return; }
    show(await response.json());
    poll();
  });
})();
