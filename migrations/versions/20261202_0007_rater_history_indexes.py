"""a rater's history in a project as covering indexes (the `next` claim reads it on every call)

The claim leaves out every pair the rater was ever assigned or judged (`_untouched_by` in
app/services/assignment.py): two hashed subplans over the rater's assignments and judgments in
the project. Through `ix_assignments_rater` (rater_id, status) and `ix_judgments_rater_id`
that was one heap page per row: 47 ms per `next` for a rater with 5,000 judgments on a
database of 1,000,000 (docs/benchmarks.md, "Scale"). With (rater_id, project_id, pair_id) both
become index-only scans.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_assignments_rater_history", "assignments", ["rater_id", "project_id", "pair_id"]
    )
    op.create_index(
        "ix_judgments_rater_history", "judgments", ["rater_id", "project_id", "pair_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_judgments_rater_history", table_name="judgments")
    op.drop_index("ix_assignments_rater_history", table_name="assignments")
