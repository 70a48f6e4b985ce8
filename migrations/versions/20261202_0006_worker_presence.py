"""worker presence (each Celery worker's row, upserted every few seconds); open pairs indexed
(the queue depth `/metrics` reports per project)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.models.base import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN_PAIR_PREDICATE = (
    "judgment_count < required_judgments AND gold_choice IS NULL AND rating_removed_at IS NULL"
)


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column(
            "queues",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("hostname", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("seen_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
        sa.UniqueConstraint("name", name=op.f("uq_workers_name")),
    )
    with op.batch_alter_table("workers") as batch:
        batch.create_index(batch.f("ix_workers_seen_at"), ["seen_at"], unique=False)
    op.create_index(
        "ix_comparison_pairs_open",
        "comparison_pairs",
        ["project_id"],
        unique=False,
        postgresql_where=sa.text(OPEN_PAIR_PREDICATE),
        sqlite_where=sa.text(OPEN_PAIR_PREDICATE),
    )


def downgrade() -> None:
    op.drop_index("ix_comparison_pairs_open", table_name="comparison_pairs")
    with op.batch_alter_table("workers") as batch:
        batch.drop_index(batch.f("ix_workers_seen_at"))
    op.drop_table("workers")
