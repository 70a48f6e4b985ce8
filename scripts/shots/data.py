"""The Data tab: the prompt browser with a filter applied, a prompt's page (a chat with
responses, pairs and judgments, one pair gold) and the upload page showing line errors."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ComparisonPair, Judgment, ModelVersion, Prompt, Response, User
from shots import Shot

BAD_FILE = (
    b'{"prompt": "What is a reward model?", "external_id": "r1"}\n'
    b'{"prompt": "Explain PPO in two sentences.", "external_id": "r2"}\n'
    b'{"prompt": "", "external_id": "r3"}\n'
    b'{"messages": [{"role": "robot", "content": "Hi"}], "external_id": "r4"}\n'
    b'{"prompt": "Why clip the ratio?", "external_id": "r2"}\n'
)


def seed(session: Session, ids: dict[str, Any]) -> None:
    """A chat prompt with three answers (one cut off), their pairs, judgments with rationales,
    aspects and a flag, and one pair marked gold."""
    project_id = session.scalar(select(Prompt.project_id).where(Prompt.id == ids["prompt"]))
    policy = session.get(ModelVersion, ids["policy"])
    raters = list(session.scalars(select(User).where(User.role == "rater").order_by(User.id)))
    prompt = Prompt(
        project_id=project_id,
        external_id="chat-kl",
        source="upload",
        messages=[
            {"role": "system", "content": "You are a patient ML tutor."},
            {"role": "user", "content": "What does the **KL penalty** do in RLHF?"},
        ],
        meta={"topic": "rlhf", "difficulty": "intro"},
    )
    session.add(prompt)
    session.flush()
    answers = [
        Response(
            prompt_id=prompt.id,
            text="It keeps the policy close to the reference model, so it cannot drift into"
            " text that games the reward model.\n\n```\nreward = score - beta * KL\n```",
            model_version_id=policy.id if policy else None,
            model_name="ppo v1",
            generation_params={
                "temperature": 0.7,
                "top_p": 0.95,
                "max_new_tokens": 128,
                "seed": 41,
            },  # fmt: skip
        ),
        Response(
            prompt_id=prompt.id,
            text="The KL penalty measures the distance between two distributions. In RLHF it"
            " is subtracted from the reward at every token so that the policy, which starts"
            " as the supervised model, keeps producing fluent text while it learns to",
            model_version_id=policy.id if policy else None,
            model_name="ppo v1",
            truncated=True,
            generation_params={
                "temperature": 0.7,
                "top_p": 0.95,
                "max_new_tokens": 48,
                "seed": 42,
            },  # fmt: skip
        ),
        Response(
            prompt_id=prompt.id,
            text="It makes training slower.",
            model_name="uploaded-m",
            generation_params={"source": "upload"},
        ),  # fmt: skip
    ]
    session.add_all(answers)
    session.flush()
    verdicts = [
        [("a", 2, "Correct and gives the formula.", ["helpfulness"], []),
         ("a", 1, "Clear, but the code block is unnecessary.", [], []),
         ("tie", None, "", [], [])],
        [("a", 2, "B is wrong: it is not about speed.", ["honesty"], []),
         ("both_bad", None, "B contains a <script> tag-like text, flagging.", [], ["broken"])],
    ]  # fmt: skip
    for n, (a, b) in enumerate([(0, 1), (0, 2)]):
        pair = ComparisonPair(
            project_id=project_id, prompt_id=prompt.id, response_a_id=answers[a].id,
            response_b_id=answers[b].id, required_judgments=3, gold_choice="a" if n else None,
        )  # fmt: skip
        session.add(pair)
        session.flush()
        for rater, (choice, strength, why, aspects, flags) in zip(
            raters, verdicts[n], strict=False
        ):
            session.add(
                Judgment(
                    project_id=project_id, pair_id=pair.id, rater_id=rater.id, choice=choice,
                    strength=strength, rationale=why, flags=flags,
                    aspects={name: "a" for name in aspects}, shown_left="ab"[rater.id % 2],
                    time_on_task_ms=21_000, active_ms=15_400 + 800 * rater.id,
                    gold_correct=(choice == "a") if n else None,
                )
            )  # fmt: skip
            pair.judgment_count += 1
    ids["data_prompt"] = prompt.id


def upload_a_bad_file(page: Any) -> None:
    page.check("input[name=kind][value=prompts]")
    page.set_input_files(
        "#upload-file",
        files=[{"name": "round-2.jsonl", "mimeType": "application/jsonl", "buffer": BAD_FILE}],
    )
    page.click(".upload-form button[type=submit]")
    page.wait_for_load_state("networkidle")


PAGES = [
    Shot("console-data-browser", lambda ids: f"/admin/projects/{ids['slug']}/data?judged=yes"),
    Shot(
        "console-data-prompt",
        lambda ids: f"/admin/projects/{ids['slug']}/prompts/{ids['data_prompt']}",
    ),
    Shot(
        "console-data-upload-errors",
        lambda ids: f"/admin/projects/{ids['slug']}/upload",
        before=upload_a_bad_file,
    ),
]
