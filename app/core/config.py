"""Settings: one class, read from the environment with the ``VERDICT_`` prefix.

The embedded default (``verdict demo``) runs on SQLite with a broker on SQLite and keeps its
generated secret under ``var/``. Production mode refuses to boot with a missing or weak secret.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT_DIR = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = ROOT_DIR / "templates"
STATIC_DIR = ROOT_DIR / "static"

MIN_SECRET_LENGTH = 32
# A random 32-character key has ~25 distinct characters; "x" * 40 or "changeme" * 4 has few.
MIN_SECRET_DISTINCT = 12


class Settings(BaseSettings):
    """Every setting Verdict reads. `.env.example` lists each one (a test checks that)."""

    model_config = SettingsConfigDict(
        env_prefix="VERDICT_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    env: Literal["development", "production"] = Field(
        "development", description="production refuses to start without a real SECRET_KEY"
    )
    var_dir: Path = Field(Path("var"), description="where the embedded default keeps its state")
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite in var_dir")
    broker_url: str = Field("", description="Celery broker; empty means SQLAlchemy on SQLite")
    result_backend: str = Field("", description="Celery result backend; empty means none")
    redis_url: str = Field("", description="optional Redis, for production broker and caching")
    api_rate_limit_per_min: int = Field(
        600,
        ge=0,
        description="API requests per token per minute (429 with Retry-After over it); 0: off."
        " Counted in Redis when redis_url is set, else in each web process",
    )
    secret_key: str = Field("", description="signs session cookies and CSRF tokens")
    artifacts_dir: Path = Field(Path(""), description="model weights; empty means var/artifacts")
    max_upload_bytes: int = Field(20 * 1024 * 1024, description="largest accepted upload")
    max_upload_records: int = Field(50_000, description="most records in one upload")
    session_max_age_s: int = Field(14 * 24 * 3600, description="browser session lifetime")
    cookie_secure: bool = Field(False, description="mark cookies Secure (behind HTTPS)")
    allow_insecure_http: bool = Field(
        False,
        description="let production run with cookie_secure off (plain HTTP on a private"
        " network); otherwise production refuses it",
    )
    base_policy: str = Field(
        "smollm2", description="default base policy: 'smollm2', a HF model id or a local path"
    )
    allow_hub_downloads: bool = Field(
        False, description="let transformers fetch a configured hub model id"
    )
    worker_heartbeat_timeout_s: int = Field(
        120, description="a running run with no heartbeat for this long is reaped"
    )
    lease_sweep_interval_s: int = Field(30, description="how often expired leases are released")
    reward_trigger_interval_s: int = Field(
        60, description="how often projects are checked for enough new judgments to retrain"
    )
    resend_queued_after_s: int = Field(
        300,
        description="a run queued this long while no run of its queue runs lost its message:"
        " the reaper sends it again",
    )
    torch_threads: int = Field(
        1,
        ge=1,
        description="torch intra-op (and inter-op) threads in each worker process (and the"
        " demo's): 1 measured faster than torch's default on a loaded 2-core host"
        " (docs/operations.md, Worker sizing)",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json: one JSON object per line with the request or run id"
    )
    metrics_dir: Path = Field(
        Path(""),
        description="prometheus_client's multiprocess directory for `verdict serve`;"
        " empty means var_dir/metrics",
    )
    metrics_token: str = Field(
        "", description="if set, /metrics wants `Authorization: Bearer <token>`; empty: open"
    )
    worker_seen_within_s: int = Field(
        60, ge=1, description="/readyz wants a worker of each queue seen this recently"
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.var_dir / 'verdict.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.var_dir / 'broker.sqlite'}"
        if self.artifacts_dir == Path(""):
            self.artifacts_dir = self.var_dir / "artifacts"
        if self.metrics_dir == Path(""):
            self.metrics_dir = self.var_dir / "metrics"
        if self.env == "production":
            self._check_production()
        return self

    def _check_production(self) -> None:
        """Production refuses a missing, short or placeholder secret, and cookies that a plain
        HTTP connection would carry (unless that is said to be intended)."""
        key = self.secret_key
        if len(key) < MIN_SECRET_LENGTH:
            raise ValueError(
                "VERDICT_SECRET_KEY must be set to a random string of at least "
                f"{MIN_SECRET_LENGTH} characters when VERDICT_ENV=production"
            )
        if len(set(key)) < MIN_SECRET_DISTINCT:
            raise ValueError(
                "VERDICT_SECRET_KEY looks like a placeholder (too few distinct characters);"
                " generate one: python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        if not self.cookie_secure and not self.allow_insecure_http:
            raise ValueError(
                "VERDICT_COOKIE_SECURE=false in production would send session cookies over plain"
                " HTTP: serve Verdict behind HTTPS, or set VERDICT_ALLOW_INSECURE_HTTP=true on a"
                " private network"
            )

    def resolved_secret_key(self) -> str:
        """The configured secret, or (outside production) one generated once and kept in var/."""
        if self.secret_key:
            return self.secret_key
        path = self.var_dir / "secret_key"
        if path.exists():
            return path.read_text().strip()
        self.var_dir.mkdir(parents=True, exist_ok=True)
        # O_EXCL: when web and worker start together, exactly one of them writes the key.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
        return path.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    return Settings()
