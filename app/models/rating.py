"""Rater work: leases on pairs (assignments) and the judgments they produce."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.models.base import Base, JSONType, utcnow
from app.models.projects import ComparisonPair

ASSIGNMENT_STATUSES = ("leased", "submitted", "skipped", "expired")


class Assignment(Base):
    """A rater's lease on a pair. One row per (pair, rater): a rater never gets a pair twice."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("pair_id", "rater_id"),
        CheckConstraint("status IN ('leased', 'submitted', 'skipped', 'expired')", name="status"),
        CheckConstraint("shown_left IN ('a', 'b')", name="shown_left"),
        Index("ix_assignments_live", "status", "expires_at"),
        Index("ix_assignments_rater", "rater_id", "status"),
        # The rater's history in a project, which every `next` leaves out: read index-only.
        Index("ix_assignments_rater_history", "rater_id", "project_id", "pair_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    pair_id: Mapped[int] = mapped_column(
        ForeignKey("comparison_pairs.id", ondelete="CASCADE"), index=True
    )
    rater_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="leased")
    shown_left: Mapped[str] = mapped_column(String(1))
    leased_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    skip_reason: Mapped[str | None] = mapped_column(Text)

    pair: Mapped[ComparisonPair] = relationship()


class RaterExclusion(Base):
    """A rater's judgments in a project left out of training, from `created_at` until lifted.

    While an exclusion is live (`lifted_at` is null) every judgment of the rater in the project,
    past and future, is left out of new snapshots; lifting it lets them back in. Rows are never
    deleted, so the history of who excluded whom, and why, stays readable.
    """

    __tablename__ = "rater_exclusions"
    __table_args__ = (
        # At most one live exclusion per rater and project.
        Index(
            "uq_rater_exclusions_live",
            "project_id",
            "rater_id",
            unique=True,
            postgresql_where=text("lifted_at IS NULL"),
            sqlite_where=text("lifted_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    rater_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    reason: Mapped[str] = mapped_column(Text)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    lifted_at: Mapped[datetime | None]
    lifted_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    lift_reason: Mapped[str | None] = mapped_column(Text)


class Judgment(Base):
    """A rater's verdict on a pair; `a`/`b` always name the pair's responses, not screen sides."""

    __tablename__ = "judgments"
    __table_args__ = (
        UniqueConstraint("pair_id", "rater_id"),
        CheckConstraint("choice IN ('a', 'b', 'tie', 'both_bad')", name="choice"),
        CheckConstraint(
            "(choice IN ('a', 'b') AND strength IN (1, 2))"
            " OR (choice IN ('tie', 'both_bad') AND strength IS NULL)",
            name="strength",
        ),
        CheckConstraint("shown_left IS NULL OR shown_left IN ('a', 'b')", name="shown_left"),
        CheckConstraint("rater_id IS NOT NULL OR source <> 'rater'", name="rater_source"),
        Index("ix_judgments_project_created", "project_id", "created_at"),
        Index("ix_judgments_rater_history", "rater_id", "project_id", "pair_id"),
        # Flagged judgments are rare: the console's "flagged" filter reads only them. The
        # predicates are the ones app.services.browse writes, so each planner can use it.
        Index(
            "ix_judgments_flagged_pair",
            "pair_id",
            postgresql_where=text("flags <> '[]'::jsonb"),
            sqlite_where=text("json_array_length(flags) > 0"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    pair_id: Mapped[int] = mapped_column(
        ForeignKey("comparison_pairs.id", ondelete="CASCADE"), index=True
    )
    # Null for imported judgments, which carry their `source` instead.
    rater_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    assignment_id: Mapped[int | None] = mapped_column(
        ForeignKey("assignments.id", ondelete="SET NULL"), unique=True
    )
    choice: Mapped[str] = mapped_column(String(16))
    strength: Mapped[int | None]
    aspects: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict)
    rationale: Mapped[str] = mapped_column(Text, default="")
    flags: Mapped[list[str]] = mapped_column(JSONType, default=list)
    shown_left: Mapped[str | None] = mapped_column(String(1))
    time_on_task_ms: Mapped[int | None]
    active_ms: Mapped[int | None]
    gold_correct: Mapped[bool | None]
    source: Mapped[str] = mapped_column(String(64), default="rater")
    extra: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    pair: Mapped[ComparisonPair] = relationship()
