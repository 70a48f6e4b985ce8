// Console behaviour shared by its pages. No inline scripts: the CSP allows only /static files.
(function () {
  "use strict";
  // <button data-confirm="..."> asks before its form is sent (promote, roll back, deactivate).
  document.addEventListener("submit", (event) => {
    const button = event.submitter;
    const question = button && button.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });
  // <button data-copy="#id"> copies the text of that element (a secret shown once).
  document.addEventListener("click", (event) => {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const source = document.querySelector(button.getAttribute("data-copy"));
    if (source && navigator.clipboard) {
      navigator.clipboard.writeText(source.textContent.trim()).then(() => {
        button.textContent = "Copied";
      });
    }
  });
})();
