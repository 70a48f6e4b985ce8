"""run kinds 'score' and 'sample': interactive model work (scoring API, playground)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "kind IN ('generate', 'reward', 'ppo', 'dpo', 'evaluate')"
NEW = "kind IN ('generate', 'reward', 'ppo', 'dpo', 'evaluate', 'score', 'sample')"


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_kind"), type_="check")
        batch.create_check_constraint("kind", NEW)


def downgrade() -> None:
    op.execute("DELETE FROM runs WHERE kind IN ('score', 'sample')")
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_kind"), type_="check")
        batch.create_check_constraint("kind", OLD)
