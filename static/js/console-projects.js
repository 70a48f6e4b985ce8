// Project forms: nothing runs without the page working too (the preview is htmx's; see
// templates/console/projects/settings.html). Kept for the slug suggestion on a new project.
(function () {
  "use strict";
  const name = document.getElementById("f-name");
  const slug = document.getElementById("f-slug");
  if (!name || !slug) return;
  let touched = slug.value !== "";
  slug.addEventListener("input", () => { touched = true; });
  name.addEventListener("input", () => {
    if (touched) return;
    slug.value = name.value.toLowerCase().normalize("NFKD").replace(/[^a-z0-9]+/g, "-")
      .replace(/^-+|-+$/g, "").slice(0, 64);
  });
})();
