// The upload page: a file dropped on the drop area fills its file input; the chosen file's name
// (and a warning when it is over the limit) shows under it; the preference options show only
// when the file holds preference pairs. Without JS the plain file input and every option work.
(function () {
  "use strict";
  const form = document.querySelector("[data-upload-form]");
  if (!form) return;
  const zone = form.querySelector("[data-dropzone]");
  const input = zone.querySelector("input[type=file]");
  const shown = zone.querySelector("[data-file-name]");
  const limit = Number(input.getAttribute("data-max-bytes")) || 0;

  function showChosen() {
    const file = input.files && input.files[0];
    shown.classList.remove("bad");
    input.setCustomValidity("");
    if (!file) {
      shown.textContent = "No file chosen";
      return;
    }
    const size = file.size.toLocaleString("en");
    shown.replaceChildren(document.createElement("strong"), document.createTextNode(` (${size} bytes)`));
    shown.firstChild.textContent = file.name;
    if (limit && file.size > limit) {
      const message = `${file.name} is ${size} bytes; the limit is ${limit.toLocaleString("en")} bytes.`;
      shown.textContent = message;
      shown.classList.add("bad");
      input.setCustomValidity(message);
    }
  }

  input.addEventListener("change", showChosen);
  ["dragenter", "dragover"].forEach((name) =>
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    })
  );
  ["dragleave", "dragend"].forEach((name) =>
    zone.addEventListener(name, () => zone.classList.remove("dragging"))
  );
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const files = event.dataTransfer && event.dataTransfer.files;
    if (!files || !files.length) return;
    const one = new DataTransfer();
    one.items.add(files[0]);
    input.files = one.files;
    showChosen();
  });

  const options = form.querySelector("[data-for-kind]");
  function showOptions() {
    const kind = form.querySelector("input[name=kind]:checked");
    options.hidden = !kind || kind.value !== options.getAttribute("data-for-kind");
  }
  form.addEventListener("change", (event) => {
    if (event.target.name === "kind") showOptions();
  });
  showOptions();
})();
