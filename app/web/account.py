"""Pages every signed-in user has, whatever the role (being built): their own API tokens, and
accepting an invitation."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(include_in_schema=False)
