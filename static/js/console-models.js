// The playground's forms post with htmx and get their card back. A form with errors comes back
// as 422 with each error at its field; htmx leaves error answers unswapped unless told.
(function () {
  "use strict";
  document.addEventListener("htmx:beforeSwap", (event) => {
    const form = event.detail.requestConfig && event.detail.requestConfig.elt;
    const status = event.detail.xhr.status;
    if (form && form.hasAttribute("data-swap-errors") && (status === 422 || status === 409)) {
      event.detail.shouldSwap = true;
      event.detail.isError = false;
    }
  });
})();
