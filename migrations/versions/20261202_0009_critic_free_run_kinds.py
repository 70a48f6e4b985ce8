"""run kinds 'rloo' and 'grpo': critic-free RL against a reward model

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "kind IN ('generate', 'reward', 'ppo', 'dpo', 'evaluate', 'score', 'sample')"
NEW = "kind IN ('generate', 'reward', 'ppo', 'rloo', 'grpo', 'dpo', 'evaluate', 'score', 'sample')"


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_kind"), type_="check")
        batch.create_check_constraint("kind", NEW)


def downgrade() -> None:
    op.execute("DELETE FROM runs WHERE kind IN ('rloo', 'grpo')")
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_kind"), type_="check")
        batch.create_check_constraint("kind", OLD)
