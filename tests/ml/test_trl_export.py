"""The `trl` export is what the field's tools read: `datasets.load_dataset("json", ...)` loads
it, and TRL's RewardTrainer and DPOTrainer train a few steps on it (tiny random models) with a
finite loss."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from datasets import load_dataset
from sqlalchemy.orm import Session
from transformers import LlamaConfig, LlamaForSequenceClassification
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

from app.core.db import make_sessionmaker
from app.models import Judgment
from app.services import exports, snapshots
from tests.conftest import Factory, empty_all_tables, engine_for
from tests.tiny_models import make_causal_lm, make_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture
def sqlite_session(sqlite_url: str) -> Iterator[Session]:
    """One backend is enough here: the export's bytes are tested on both elsewhere."""
    session = make_sessionmaker(engine_for(sqlite_url))()
    yield session
    session.close()
    empty_all_tables(sqlite_url)


@pytest.fixture
def exported(sqlite_session: Session, tmp_path: Path) -> Path:
    """A snapshot's trl export of eight judged pairs (two raters on some, strengths 1 and 2)."""
    factory = Factory(sqlite_session)
    project = factory.project("trl-export")
    raters = [factory.user("rater"), factory.user("rater")]
    for i in range(8):
        pair = factory.pair(
            project,
            (f"Paris is the capital of France. ({i})", f"maybe no ({i})"),
            prompt=f"What is the capital of France? Answer kindly. ({i})",
        )
        for rater in raters[: 1 + i % 2]:
            sqlite_session.add(
                Judgment(project_id=project.id, pair_id=pair.id, rater_id=rater.id,
                         choice="a" if i != 3 else "b", strength=1 + i % 2)
            )  # fmt: skip
    sqlite_session.commit()
    snapshot = snapshots.create_snapshot(sqlite_session, project)
    sqlite_session.commit()
    plan = exports.prepare_export(
        sqlite_session, project, "trl", snapshot_id=snapshot.id, secret_key="unused"
    )
    path = tmp_path / plan.filename
    path.write_bytes(b"".join(exports.stream_export(sqlite_session, plan)))
    return path


def test_datasets_loads_the_export(exported: Path) -> None:
    data = load_dataset("json", data_files=str(exported), split="train")
    assert len(data) == 12  # 4 pairs judged once, 4 judged twice
    assert set(data.column_names) == {
        "id", "snapshot", "prompt", "chosen", "rejected", "margin", "label"
    }  # fmt: skip
    assert data[0]["prompt"][0]["role"] == "user"
    assert data[0]["chosen"] == [
        {"role": "assistant", "content": "Paris is the capital of France. (0)"}
    ]
    assert sorted(set(data["margin"])) == [0.0, 1.0]


def test_reward_trainer_accepts_it(exported: Path, tmp_path: Path) -> None:
    tok = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config)
    data = load_dataset("json", data_files=str(exported), split="train")
    args = RewardConfig(
        output_dir=str(tmp_path / "rm"), max_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, max_length=128, disable_tqdm=True,
    )  # fmt: skip
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_dpo_trainer_accepts_it(exported: Path, tmp_path: Path) -> None:
    tok = make_tokenizer()
    data = load_dataset("json", data_files=str(exported), split="train")
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"), max_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, max_length=128, disable_tqdm=True,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=make_causal_lm(tok, seed=0),
        ref_model=make_causal_lm(tok, seed=0),
        args=args,
        train_dataset=data,
        processing_class=tok,
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
