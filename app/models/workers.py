"""Worker presence: each Celery worker upserts its row every few seconds (`services/presence.py`).

`/readyz` asks whether a worker of each queue was seen recently, and `/metrics` reports each
one's heartbeat age. A row is never deleted: a stopped worker's row just grows old, which is
what both readers want to see (rows of workers renamed away can be dropped by hand).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, JSONType, utcnow


class Worker(Base):
    """One Celery worker node, by its node name (`gpu@host`), unique across hosts."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    queues: Mapped[list[str]] = mapped_column(JSONType, default=list)
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
