"""comparison_pairs queue index in the full order `next` uses

ix_comparison_pairs_queue was (project_id, judgment_count, priority); the claim orders by
judgment_count, priority DESC, created_at, id, so PostgreSQL sorted every open pair of the
project on each `next`. With the index in that exact order it stops at the first pair it may
lease.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("comparison_pairs") as batch:
        batch.drop_index("ix_comparison_pairs_queue")
        batch.create_index(
            "ix_comparison_pairs_queue",
            ["project_id", "judgment_count", sa.text("priority DESC"), "created_at", "id"],
        )


def downgrade() -> None:
    with op.batch_alter_table("comparison_pairs") as batch:
        batch.drop_index("ix_comparison_pairs_queue")
        batch.create_index(
            "ix_comparison_pairs_queue", ["project_id", "judgment_count", "priority"]
        )
