"""The score gain's interval where the console shows the gain: the versions table, next to the
point gain, and a version page's figures and promotion-rule line. A version evaluated before
intervals were recorded still shows its gain, without an interval."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from app.models import ModelVersion, User
from app.services import evaluation
from app.services.projects import ProjectSettings
from tests.conftest import Factory
from tests.console.conftest import Seeded

Make = Callable[[User | None], Any]

FIGURES = {
    "score_gain": 0.22, "score_gain_interval": [-0.05, 0.41], "confidence": 0.95,
    "num_prompts": 11, "win_share": 0.55, "win_share_interval": [0.27, 0.82],
    "kl_to_parent": 2.5, "mean_score": 0.4, "parent_mean_score": 0.18,
}  # fmt: skip


def _evaluated(factory: Factory, seeded: Seeded) -> ModelVersion:
    version = factory.session.get(ModelVersion, seeded.policy.id)
    assert version is not None
    passed, why = evaluation.promotion_rule(ProjectSettings(), FIGURES)
    version.metrics = {
        "score_gain": FIGURES["score_gain"],
        "score_gain_interval": FIGURES["score_gain_interval"],
        "win_share": FIGURES["win_share"],
        "kl_to_parent": FIGURES["kl_to_parent"],
        "evaluation": {**FIGURES, "samples": []},
        "promotion_rule": {"passed": passed, "reason": why},
    }
    factory.session.commit()
    return version


def test_the_versions_table_shows_the_interval_next_to_the_gain(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    policy = _evaluated(factory, seeded)
    html = browser_for(seeded.reviewer).get(f"/admin/projects/{seeded.project.slug}/models").text
    row = html[html.index(f'href="/admin/models/{policy.id}"') :].split("</tr>")[0]
    cells = re.findall(r'<td class="num">(.*?)</td>', row, flags=re.S)
    assert cells[0].startswith("+0.220 <span") and "[-0.050, +0.410]</span>" in cells[0]
    assert cells[1] == "2.50"
    # The rule's reason, in the cell's title, names the interval and says why it failed.
    assert "✗ not passed" in row and "lower end -0.0500 &lt; 0" in row


def test_a_gain_without_an_interval_shows_alone(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    version = factory.session.get(ModelVersion, seeded.policy.id)
    assert version is not None
    version.metrics = {"score_gain": 0.3, "kl_to_parent": 1.2}
    factory.session.commit()
    html = browser_for(seeded.reviewer).get(f"/admin/projects/{seeded.project.slug}/models").text
    row = html[html.index(f'href="/admin/models/{version.id}"') :].split("</tr>")[0]
    assert '<td class="num">+0.300</td>' in row


def test_the_version_page_shows_the_interval_and_the_rule_that_read_it(
    seeded: Seeded, factory: Factory, browser_for: Make
) -> None:
    policy = _evaluated(factory, seeded)
    html = browser_for(seeded.reviewer).get(f"/admin/models/{policy.id}").text
    assert "<dt>score_gain_interval</dt><dd>-0.05 to 0.41</dd>" in html
    assert "<dt>win_share_interval</dt><dd>0.27 to 0.82</dd>" in html
    assert "<dt>confidence</dt><dd>0.95</dd>" in html
    assert "Promotion rule not passed" in html
    assert "95 % interval [-0.0500, +0.4100] over 11 prompts: lower end -0.0500 &lt; 0" in html
