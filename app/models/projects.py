"""What gets judged: projects, their prompts, responses and the comparison pairs built on them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.models.base import Base, JSONType, utcnow

CHOICES = ("a", "b", "tie", "both_bad")


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    guidelines: Mapped[str] = mapped_column(Text, default="")
    # Stored as given; services.projects.ProjectSettings fills the defaults on read.
    settings: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))


class ProjectMember(Base):
    """A rater staffed on a project. A project with no members is open to every rater; once it
    has one, raters see it (and get its comparisons) only if they are members."""

    __tablename__ = "project_members"
    __table_args__ = (UniqueConstraint("project_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    added_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (
        UniqueConstraint("project_id", "external_id"),
        CheckConstraint("text IS NOT NULL OR messages IS NOT NULL", name="text_or_messages"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    external_id: Mapped[str | None] = mapped_column(String(200))
    text: Mapped[str | None] = mapped_column(Text)
    messages: Mapped[list[dict[str, str]] | None] = mapped_column(JSONType)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    source: Mapped[str] = mapped_column(String(64), default="api")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    responses: Mapped[list[Response]] = relationship(back_populates="prompt")


class Response(Base):
    """One answer to a prompt: written by a model version of ours, or uploaded with a model name."""

    __tablename__ = "responses"

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), index=True
    )
    model_name: Mapped[str | None] = mapped_column(String(200))
    generation_params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    truncated: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    prompt: Mapped[Prompt] = relationship(back_populates="responses")


class ComparisonPair(Base):
    """Two responses to one prompt, to be judged by `required_judgments` different raters."""

    __tablename__ = "comparison_pairs"
    __table_args__ = (
        UniqueConstraint("response_a_id", "response_b_id"),
        CheckConstraint("response_a_id <> response_b_id", name="distinct_responses"),
        CheckConstraint("required_judgments >= 1", name="required_positive"),
        CheckConstraint("judgment_count >= 0", name="count_nonnegative"),
        CheckConstraint(
            "gold_choice IS NULL OR gold_choice IN ('a', 'b', 'tie', 'both_bad')", name="gold"
        ),
        CheckConstraint("kind IN ('standard', 'version_eval')", name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    response_a_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    response_b_id: Mapped[int] = mapped_column(
        ForeignKey("responses.id", ondelete="CASCADE"), index=True
    )
    required_judgments: Mapped[int] = mapped_column(default=3)
    # Kept in step with the judgments table inside the submit transaction.
    judgment_count: Mapped[int] = mapped_column(default=0)
    gold_choice: Mapped[str | None] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(default=0)
    kind: Mapped[str] = mapped_column(String(16), default="standard")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Moderation (app.services.moderation). Flags raised before `moderated_at` were reviewed;
    # a pair excluded from training keeps its judgments but snapshots leave them out; a pair
    # removed from rating is no longer served and is excluded from training too.
    moderated_at: Mapped[datetime | None]
    training_excluded_at: Mapped[datetime | None]
    rating_removed_at: Mapped[datetime | None]

    prompt: Mapped[Prompt] = relationship()
    response_a: Mapped[Response] = relationship(foreign_keys=[response_a_id])
    response_b: Mapped[Response] = relationship(foreign_keys=[response_b_id])


# The queue, in the order `next` hands pairs out (fewest judgments, highest priority, oldest):
# the claim walks this index and stops at the first pair it may lease instead of sorting all.
Index(
    "ix_comparison_pairs_queue",
    ComparisonPair.project_id,
    ComparisonPair.judgment_count,
    ComparisonPair.priority.desc(),
    ComparisonPair.created_at,
    ComparisonPair.id,
)
# The pairs raters can still be given (`/metrics`' queue depth per project): a partial index
# holding only those, so counting them per scrape reads the open pairs, not every pair ever made.
# A query must repeat this predicate word for word for the planner to use the index.
OPEN_PAIR_PREDICATE = (
    "judgment_count < required_judgments AND gold_choice IS NULL AND rating_removed_at IS NULL"
)
Index(
    "ix_comparison_pairs_open",
    ComparisonPair.project_id,
    postgresql_where=text(OPEN_PAIR_PREDICATE),
    sqlite_where=text(OPEN_PAIR_PREDICATE),
)
