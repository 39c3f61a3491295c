"""A FastAPI service with an encrypted model, on SQLAlchemy's asyncio extension.

    pip install -e ".[fastapi]" && python examples/fastapi_app.py [--host H] [--port P]

then open http://127.0.0.1:8000/docs (host and port also from HOST and PORT;
the arguments win). DATABASE_URL picks the database
(default: an aiosqlite file in the working directory; postgresql+asyncpg://
URLs work too). The root key comes from the ENVELOPE_* variables; if none is
set, the app makes a throwaway key for this run only, so the data it writes
is unreadable after a restart: in a real service, a missing root key is a
configuration error, never a default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_envelope import (
    AsyncKeyRegistry,
    ConfigurationError,
    EncryptedType,
    StaticRootKey,
    blind_index,
)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(EncryptedType(sa.String(200)))
    email: Mapped[str] = mapped_column(EncryptedType(sa.String(320)))
    email_index: Mapped[str | None] = blind_index("email", normalize=["strip", "casefold"])
    born: Mapped[date] = mapped_column(EncryptedType(sa.Date))


class PatientIn(BaseModel):
    name: str
    email: str
    born: date


class PatientOut(PatientIn):
    id: int


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


Session = Annotated[AsyncSession, Depends(_session)]


def _registry(engine: AsyncEngine) -> AsyncKeyRegistry:
    try:
        return AsyncKeyRegistry.from_env(engine)
    except ConfigurationError:
        print("no ENVELOPE_* root key set: using a throwaway key", file=sys.stderr)
        return AsyncKeyRegistry(engine, StaticRootKey(os.urandom(32)))


def create_app(database_url: str | None = None) -> FastAPI:
    url = database_url or os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///fastapi-example.db")
    engine = create_async_engine(url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = _registry(engine)
        await registry.init()
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        app.state.registry = registry
        app.state.sessions = sessions
        yield
        await registry.close()
        await engine.dispose()

    app = FastAPI(title="sqlalchemy-envelope example", lifespan=lifespan)

    def out(patient: Patient) -> PatientOut:
        return PatientOut(id=patient.id, name=patient.name, email=patient.email, born=patient.born)

    @app.post("/patients", status_code=201)
    async def create_patient(data: PatientIn, db: Session) -> PatientOut:
        patient = Patient(name=data.name, email=data.email, born=data.born)
        db.add(patient)
        await db.commit()
        return out(patient)

    @app.get("/patients/{patient_id}")
    async def read_patient(patient_id: int, db: Session) -> PatientOut:
        patient = await db.get(Patient, patient_id)
        if patient is None:
            raise HTTPException(404, "no such patient")
        return out(patient)

    @app.get("/patients")
    async def find_patients(email: str, db: Session) -> list[PatientOut]:
        """Equality lookup on the encrypted email, through its blind index."""
        query = sa.select(Patient).where(Patient.email_index.matches(email))
        return [out(p) for p in (await db.scalars(query)).all()]

    @app.get("/keys")
    async def key_status() -> dict[str, object]:
        status = await app.state.registry.status()
        return {"active_version": status.active_version, "keys": status.keys_by_state}

    @app.post("/keys/rotate")
    async def rotate() -> dict[str, int]:
        info = await app.state.registry.rotate()
        return {"active_version": info.version}

    return app


def main(argv: list[str] | None = None) -> None:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="The sqlalchemy-envelope FastAPI example.")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"), help="[env: HOST]")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", "8000")), help="[env: PORT]"
    )
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
