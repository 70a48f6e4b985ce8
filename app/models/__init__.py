"""SQLAlchemy models. Importing this package registers every table on `Base.metadata`."""

from app.models.audit import AuditEvent
from app.models.base import Base, utcnow
from app.models.projects import ComparisonPair, Project, ProjectMember, Prompt, Response
from app.models.rating import Assignment, Judgment, RaterExclusion
from app.models.training import DatasetSnapshot, ModelVersion, Run, RunMetric
from app.models.users import ApiToken, Invite, User
from app.models.workers import Worker

__all__ = [
    "ApiToken",
    "Assignment",
    "AuditEvent",
    "Base",
    "ComparisonPair",
    "DatasetSnapshot",
    "Invite",
    "Judgment",
    "ModelVersion",
    "Project",
    "ProjectMember",
    "Prompt",
    "RaterExclusion",
    "Response",
    "Run",
    "RunMetric",
    "User",
    "Worker",
    "utcnow",
]
