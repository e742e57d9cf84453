"""Queries of projects and API keys (ORM sessions: low traffic, and shared with the CLI)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from shared.models import ApiKey, Project


async def get_project(session: AsyncSession, project_id: uuid.UUID) -> Project | None:
    return await session.get(Project, project_id)


async def slug_taken(session: AsyncSession, slug: str) -> bool:
    return (await session.scalar(select(col(Project.id)).where(col(Project.slug) == slug))) is not None


async def list_projects(session: AsyncSession) -> Sequence[Project]:
    stmt = select(Project).order_by(col(Project.created_at), col(Project.id))
    return (await session.scalars(stmt)).all()


async def get_api_key(session: AsyncSession, key_id: uuid.UUID) -> ApiKey | None:
    return await session.get(ApiKey, key_id)


async def list_api_keys(session: AsyncSession, project_id: uuid.UUID | None) -> Sequence[ApiKey]:
    # project_id None: the admin keys.
    owner = col(ApiKey.project_id).is_(None) if project_id is None else col(ApiKey.project_id) == project_id
    stmt = select(ApiKey).where(owner).order_by(col(ApiKey.created_at), col(ApiKey.id))
    return (await session.scalars(stmt)).all()
