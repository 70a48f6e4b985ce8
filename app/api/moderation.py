"""(filled in by the data-quality issue)"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
