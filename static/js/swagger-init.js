// Starts Swagger UI on /docs. Lives in a file because the CSP forbids inline scripts.
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
});
