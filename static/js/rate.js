// Rater workspace: keyboard, focus, active time, in-place errors. Loaded as a file (CSP forbids
// inline scripts); all requests go through htmx, which app.js gives the CSRF header.
(function () {
  "use strict";

  const IDLE_AFTER_MS = 60000; // no input for a minute: the rater is away, stop counting
  let activeMs = 0;
  let lastTick = performance.now();
  let lastInput = lastTick;
  let currentTask = null;

  const $ = (sel, root) => (root || document).querySelector(sel);
  const form = () => $("#judgment-form");

  function openDialog(id) {
    const dialog = document.getElementById(id);
    if (!dialog || dialog.open) return;
    dialog.showModal();
    const first = dialog.querySelector("input:checked, input, button.primary, button");
    if (first) first.focus();
  }

  function openDialogs() {
    return document.querySelectorAll("dialog[open]");
  }

  function focusTask() {
    const title = $("#task-title");
    if (title) title.focus({ preventScroll: false });
  }

  function newTaskShown() {
    const task = $("#task");
    const id = task ? task.getAttribute("data-assignment-id") || "done" : null;
    if (id === currentTask) return;
    currentTask = id;
    activeMs = 0;
    lastTick = performance.now();
    lastInput = lastTick;
    window.scrollTo(0, 0);
    focusTask();
  }

  // --- active time: visible page, with input in the last minute -------------------------
  function markInput() { lastInput = performance.now(); }
  ["keydown", "pointerdown", "pointermove", "wheel", "scroll", "input"].forEach((name) =>
    document.addEventListener(name, markInput, { capture: true, passive: true }));
  setInterval(() => {
    const now = performance.now();
    if (document.visibilityState === "visible" && now - lastInput < IDLE_AFTER_MS) {
      activeMs += now - lastTick;
    }
    lastTick = now;
  }, 1000);

  // Capture phase: runs before htmx reads the form on its own submit listener.
  document.addEventListener("submit", (event) => {
    const target = event.target;
    if (target && target.id === "judgment-form") {
      const field = target.querySelector('input[name="active_ms"]');
      if (field) field.value = String(Math.round(activeMs));
    }
    if (target && target.classList && target.classList.contains("skip-form")) {
      const dialog = target.closest("dialog");
      if (dialog && dialog.open) dialog.close();
    }
  }, true);

  // --- keyboard -------------------------------------------------------------------------
  function isTyping(el) {
    if (!el) return false;
    const tag = el.tagName;
    if (tag === "TEXTAREA") return true;
    if (tag === "INPUT") return ["text", "search", "email", "password", ""].includes(el.type);
    return el.isContentEditable;
  }

  function choose(value) {
    const f = form();
    const radio = f && f.querySelector('input[name="scale"][value="' + value + '"]');
    if (radio) {
      radio.checked = true;
      radio.focus();
    }
  }

  function submitJudgment() {
    const f = form();
    if (!f) return;
    if (!f.querySelector('input[name="scale"]:checked')) {
      showHint("Pick a verdict first: 1–5, or 0 for both bad.");
      return;
    }
    f.requestSubmit();
  }

  function showHint(text) {
    const status = $("#task-status");
    if (status) {
      status.textContent = text;
      status.className = "task-status error";
    }
  }

  document.addEventListener("keydown", (event) => {
    if (event.defaultPrevented || event.altKey || event.metaKey || event.isComposing) return;
    const el = document.activeElement;
    const dialogs = openDialogs();
    if (dialogs.length) {
      // Inside the skip dialog Enter confirms from any control, not only the text box.
      const skip = document.getElementById("skip-dialog");
      if (event.key === "Enter" && skip && skip.open && el && el.tagName !== "BUTTON") {
        event.preventDefault();
        skip.querySelector("form").requestSubmit();
      }
      return; // Esc closes natively; other keys belong to the dialog
    }
    if (isTyping(el)) {
      if (event.key === "Escape") {
        el.blur();
        focusTask();
      } else if (event.key === "Enter" && event.ctrlKey && el.closest("#judgment-form")) {
        event.preventDefault();
        submitJudgment();
      }
      return;
    }
    if (event.ctrlKey) return;
    const key = event.key;
    if (/^[0-5]$/.test(key)) {
      event.preventDefault();
      choose(key);
    } else if (key === "Enter") {
      if (el && (el.tagName === "BUTTON" || el.tagName === "A" || el.tagName === "SUMMARY")) return;
      event.preventDefault();
      submitJudgment();
    } else if (key === "s") {
      event.preventDefault();
      openDialog("skip-dialog");
    } else if (key === "f") {
      event.preventDefault();
      const flag = $('#flags input[type="checkbox"]');
      if (flag) flag.focus();
    } else if (key === "r") {
      event.preventDefault();
      const rationale = $("#rationale");
      if (rationale) rationale.focus();
    } else if (key === "g") {
      event.preventDefault();
      openDialog("guidelines-dialog");
    } else if (key === "?") {
      event.preventDefault();
      openDialog("help-dialog");
    }
  });

  // --- buttons that open and close dialogs ----------------------------------------------
  document.addEventListener("click", (event) => {
    const opener = event.target.closest("[data-open-dialog]");
    if (opener) {
      openDialog(opener.getAttribute("data-open-dialog"));
      return;
    }
    const closer = event.target.closest("[data-close-dialog]");
    if (closer) {
      const dialog = closer.closest("dialog");
      if (dialog) dialog.close();
    }
  });

  // Typing another reason picks "Other".
  document.addEventListener("input", (event) => {
    if (event.target && event.target.id === "other-reason") {
      const other = $('#skip-dialog input[name="reason"][value="other"]');
      if (other) other.checked = true;
    }
  });

  // --- htmx: errors replace only the status line, so what the rater typed stays ----------
  document.addEventListener("htmx:beforeSwap", (event) => {
    const status = event.detail.xhr.status;
    if (status === 401 || status === 403 || status === 404 || status === 409 || status === 422) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });
  document.addEventListener("htmx:afterSettle", () => {
    const status = $("#task-status.error");
    if (status && status.querySelector("button")) status.querySelector("button").focus();
    newTaskShown();
  });
  document.addEventListener("htmx:sendError", () => {
    showHint("The server could not be reached. Your answer is still here; press Enter to retry.");
  });

  document.addEventListener("DOMContentLoaded", newTaskShown);
})();
