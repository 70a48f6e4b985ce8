// Shared page behaviour. No inline scripts anywhere: the CSP allows only files from /static.
(function () {
  "use strict";
  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }
  // Every htmx request carries the session's CSRF token.
  document.addEventListener("htmx:configRequest", (event) => {
    event.detail.headers["X-CSRF-Token"] = csrfToken();
  });
  window.verdict = { csrfToken };
})();
