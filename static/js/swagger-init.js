// Starts Swagger UI on /docs. Lives in a file because the CSP forbids inline scripts.
// A request sent as the logged-in user (the session cookie) carries the session's CSRF token,
// as every other write from a page does; with "Authorize" and a token, the token is used.
window.addEventListener("DOMContentLoaded", () => {
  const meta = document.querySelector('meta[name="csrf-token"]');
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
    requestInterceptor: (request) => {
      if (meta) request.headers["X-CSRF-Token"] = meta.getAttribute("content");
      return request;
    },
  });
});
