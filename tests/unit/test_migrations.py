"""Migrations are the schema: `alembic upgrade head` on an empty database yields exactly the
models (autogenerate finds no difference), on SQLite and on PostgreSQL, and downgrade works."""

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from app.core.migrate import alembic_config
from app.models import Base
from tests.conftest import engine_for


def test_models_and_migrations_agree(db_url: str) -> None:
    # The db_url fixture's database was created empty and migrated with `alembic upgrade head`.
    with engine_for(db_url).connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_downgrade_and_upgrade_again(tmp_path: object) -> None:
    from pathlib import Path

    url = f"sqlite:///{Path(str(tmp_path)) / 'fresh.db'}"
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "base")
    engine = sa.create_engine(url)
    assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    command.upgrade(cfg, "head")
    assert set(Base.metadata.tables) <= set(sa.inspect(engine).get_table_names())
    engine.dispose()
