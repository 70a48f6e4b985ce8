from fastapi.testclient import TestClient


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    # No worker ever ran here: not ready, though the database answers (tests/api/test_readyz.py).
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["database"] == "ok"


def test_openapi_lists_the_upload_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    upload = spec["paths"]["/api/v1/projects/{slug}/prompts"]["post"]
    assert set(upload["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text


def test_security_headers_on_pages_api_answers_and_errors(client: TestClient) -> None:
    for response in (
        client.get("/healthz"),
        client.get("/login"),
        client.get("/api/v1/projects"),  # 401
        client.get("/no-such-page"),
    ):
        assert response.headers["content-security-policy"].startswith("default-src 'self'")
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "same-origin"
