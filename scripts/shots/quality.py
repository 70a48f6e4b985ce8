"""Quality: a project's Quality tab with careful raters, a noisy, a left-clicking and a random one,
so that outliers show with their reasons, a week-by-week drift and an excluded rater."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.models import ComparisonPair, Judgment, Prompt, Response, User, utcnow
from app.services import exclusions, projects, users
from shots import Shot

# email -> (chance of picking the worse response, median seconds per judgment, first week).
RATERS = {
    "careful.ana@verdict.local": (0.05, 14.0, 0),
    "careful.ben@verdict.local": (0.05, 11.0, 0),
    "careful.dee@verdict.local": (0.05, 16.0, 0),
    "careful.eve@verdict.local": (0.05, 12.0, 0),
    "noisy.cy@verdict.local": (0.35, 9.0, 0),
    "left.clicker@verdict.local": (-1.0, 1.8, 2),  # always the left side, from week 3
    "coin.flip@verdict.local": (0.5, 3.5, 0),
}
WEEKS = 4


def seed(session: Session, ids: dict[str, Any]) -> None:
    """Thirty prompts with three answers each (the first is best, the last worst), every pair
    judged by three of the raters above over four weeks; some pairs are gold; the random rater
    is excluded already."""
    # A seed whose draw leaves the careful raters unflagged (with others, one of them is now
    # and then flagged by chance, which is what a 95 % interval does), so the picture shows
    # the outliers it is about.
    rng = random.Random(18)
    project = projects.get_project(session, str(ids["slug"]))
    admin = session.get(User, ids["admin"])
    assert admin is not None
    raters = {
        email: users.create_user(session, email, "screenshot password", "rater") for email in RATERS
    }
    now = utcnow()
    for i in range(30):
        prompt = Prompt(
            project_id=project.id, text=f"Summarise article {i + 1}.", source="upload",
            external_id=f"quality-{i}",
        )  # fmt: skip
        session.add(prompt)
        session.flush()
        answers = [
            Response(prompt_id=prompt.id, text=f"Summary {label} of article {i + 1}.",
                     model_name="base")
            for label in "abc"
        ]  # fmt: skip
        session.add_all(answers)
        session.flush()
        week = i * WEEKS // 30
        for better, worse in ((0, 1), (1, 2), (0, 2)):
            # Which answer a pair stores as "a" is arbitrary, as for generated pairs.
            right, wrong = rng.choice((("a", "b"), ("b", "a")))
            first, second = (better, worse) if right == "a" else (worse, better)
            gold = right if (i + better) % 7 == 0 else None
            pair = ComparisonPair(
                project_id=project.id, prompt_id=prompt.id, response_a_id=answers[first].id,
                response_b_id=answers[second].id, required_judgments=3, gold_choice=gold,
            )  # fmt: skip
            session.add(pair)
            session.flush()
            eligible = [e for e, (_, _, first) in RATERS.items() if week >= first]
            for email in rng.sample(eligible, 3):
                noise, seconds, _ = RATERS[email]
                left = rng.choice("ab")
                if noise < 0:
                    choice = left
                elif rng.random() < 0.06 and noise < 0.5:
                    choice = "tie"
                else:
                    choice = wrong if rng.random() < noise else right
                # Careful raters call the widest gap (best vs worst) "much better".
                strength = 2 if (better, worse) == (0, 2) and noise < 0.1 else rng.choice((1, 2))
                session.add(
                    Judgment(
                        project_id=project.id, pair_id=pair.id, rater_id=raters[email].id,
                        choice=choice, strength=strength if choice in "ab" else None,
                        shown_left=left, active_ms=int(seconds * 1000 * rng.uniform(0.6, 1.5)),
                        gold_correct=(choice == gold) if gold else None,
                        created_at=now - timedelta(days=7 * (WEEKS - 1 - week) + rng.uniform(0, 5)),
                    )
                )  # fmt: skip
                pair.judgment_count += 1
    session.flush()
    exclusions.exclude_rater(
        session, project, raters["coin.flip@verdict.local"].id, actor=admin,
        reason="Answers at random, about 3 s per judgment",
    )  # fmt: skip


def _open_first_outlier(page: Any) -> None:
    """Unfold the exclude form of the first highlighted rater, with a reason typed in."""
    row = page.locator("tbody.outlier:not(.excluded)").first
    row.locator("summary").click()
    row.locator("input[name=reason]").fill("Clicks the left side, 2 s per judgment")


PAGES = [
    Shot(
        "console-quality",
        lambda ids: f"/admin/projects/{ids['slug']}/quality",
        before=_open_first_outlier,
    ),
]
