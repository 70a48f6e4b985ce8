"""rater exclusions, pair moderation state, the audit log indexed by actor

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.models.base import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rater_exclusions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("rater_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("lifted_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("lifted_by_id", sa.Integer(), nullable=True),
        sa.Column("lift_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_rater_exclusions_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["rater_id"], ["users.id"], name=op.f("fk_rater_exclusions_rater_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["created_by_id"], ["users.id"], name=op.f("fk_rater_exclusions_created_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["lifted_by_id"], ["users.id"], name=op.f("fk_rater_exclusions_lifted_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rater_exclusions")),
    )  # fmt: skip
    with op.batch_alter_table("rater_exclusions") as batch:
        batch.create_index(batch.f("ix_rater_exclusions_project_id"), ["project_id"], unique=False)
    op.create_index(
        "uq_rater_exclusions_live",
        "rater_exclusions",
        ["project_id", "rater_id"],
        unique=True,
        postgresql_where=sa.text("lifted_at IS NULL"),
        sqlite_where=sa.text("lifted_at IS NULL"),
    )
    with op.batch_alter_table("comparison_pairs") as batch:
        batch.add_column(sa.Column("moderated_at", UTCDateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("training_excluded_at", UTCDateTime(timezone=True), nullable=True)
        )
        batch.add_column(sa.Column("rating_removed_at", UTCDateTime(timezone=True), nullable=True))
    op.create_index("ix_audit_events_actor", "audit_events", ["actor_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_audit_events_actor", table_name="audit_events")
    with op.batch_alter_table("comparison_pairs") as batch:
        batch.drop_column("rating_removed_at")
        batch.drop_column("training_excluded_at")
        batch.drop_column("moderated_at")
    op.drop_index("uq_rater_exclusions_live", table_name="rater_exclusions")
    with op.batch_alter_table("rater_exclusions") as batch:
        batch.drop_index(batch.f("ix_rater_exclusions_project_id"))
    op.drop_table("rater_exclusions")
