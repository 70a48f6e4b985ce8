"""What a run records about itself is always storable: model output in a run's result (a PPO
sample table), its error and its log lines may hold NUL, which PostgreSQL's text and jsonb
refuse. Before this, such a run could never record its end: its worker's final write failed,
the reaper retried it, and after three attempts it failed with a misleading "worker stopped".
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.jobs import runner
from app.models import Run
from app.services import runs
from tests.conftest import Factory


def test_a_result_error_and_log_with_nul_are_stored(
    session: Session, settings: Settings, factory: Factory
) -> None:
    run = runs.create_run(session, factory.project(), "generate", settings=settings)
    session.commit()
    assert runner.claim_run(session, run.id, worker="w1") == 1
    hooks = runner.RunHooks(settings.database_url, run.id, 1, heartbeat_interval_s=60)
    hooks.progress(1, 2, "step 1 sample: 'a\x00b'")
    samples = {"1": [{"response": "x\x00y", "k\x00": ("t\x00", 1.5, None)}]}
    hooks.finish("failed", error="Boom: \x00", result={"samples": samples})
    session.expire_all()
    row = session.get(Run, run.id)
    assert row is not None and row.status == "failed"
    assert row.error == "Boom: \ufffd"
    assert row.result == {
        "samples": {"1": [{"response": "x\ufffdy", "k\ufffd": ["t\ufffd", 1.5, None]}]}
    }
    assert "step 1 sample: 'a\ufffdb'" in row.log_tail and "\x00" not in row.log_tail
