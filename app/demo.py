"""`verdict demo`: the whole product on the embedded default (SQLite under var/)."""

from __future__ import annotations

from sqlalchemy import select

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.security import new_one_time_password
from app.demo_data import DEMO_GUIDELINES, DEMO_PROMPTS
from app.models import Prompt, User
from app.services import projects, prompts, users
from app.services.errors import NotFound

DEMO_ADMIN_EMAIL = "admin@verdict.local"
DEMO_SLUG = "demo"


def seed_demo() -> str | None:
    """Create the demo admin and project if missing. Returns the admin's new password, if any."""
    password: str | None = None
    with session_scope() as session:
        if users.get_user_by_email(session, DEMO_ADMIN_EMAIL) is None:
            password = new_one_time_password()
            users.create_user(session, DEMO_ADMIN_EMAIL, password, "admin")
        admin = session.scalar(select(User).where(User.email == DEMO_ADMIN_EMAIL))
        try:
            project = projects.get_project(session, DEMO_SLUG)
        except NotFound:
            project = projects.create_project(
                session,
                DEMO_SLUG,
                "Demo: helpful answers",
                guidelines=DEMO_GUIDELINES,
                actor_id=admin.id if admin else None,
            )
        has_prompts = session.scalar(select(Prompt.id).where(Prompt.project_id == project.id))
        if has_prompts is None:
            records = [
                prompts.PromptRecord(line=i, text=text, external_id=f"demo-{i:03d}")
                for i, text in enumerate(DEMO_PROMPTS, 1)
            ]
            prompts.store_prompts(session, project, records, source="demo")
    return password


def run_demo(host: str, port: int) -> None:
    from app.cli import upgrade_database

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings)
    password = seed_demo()
    print()
    print(f"  Verdict demo: http://{host}:{port}/")
    print(f"  admin email:  {DEMO_ADMIN_EMAIL}")
    if password:
        print(f"  password:     {password}   (shown once; change it with `verdict user password`)")
    else:
        print(
            "  password:     printed at the first start; reset: "
            f"verdict user password --email {DEMO_ADMIN_EMAIL}"
        )
    print()
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level="info")
