"""The study store (SQLAlchemy 2): one ``studies`` row per POSTed study.

The row is the API's own record of a study: its spec, status, the Ray submission it runs as, and
the MLflow experiment / parent run it logs to. Trials live in Optuna's storage and MLflow, never here.
SQLite in the embedded default, Postgres in the compose deployment (same code). The schema is made and
upgraded by Alembic (service/core/migrations, :meth:`StudyStore.migrate`).

Limits that hold across API processes sharing the database: the active-study count and the insert
run under the ``store_locks`` row (an ``UPDATE`` first: a row lock on Postgres, SQLite's write lock),
and the per-key rate limit is a token bucket per name in ``rate_buckets``, taken in one upsert
(:meth:`StudyStore.take_token`). The unique ``idempotency_key`` makes a replay return the first study.
"""

from __future__ import annotations

import enum
import json
import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Float, Integer, String, Text, case, create_engine, event, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class StudyStatus(enum.StrEnum):
    """``PENDING -> RUNNING -> SUCCEEDED | FAILED | CANCELLED | INTERRUPTED`` (``STOPPING`` between a
    cancel and the job's end). ``INTERRUPTED``: the study driver died without ending the study itself
    (killed by a signal or the OOM killer, its node lost, the cluster restarted); it did not fail, and
    ``resume`` continues it from the last saved Tune state and the Optuna study."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"

    @property
    def is_terminal(self) -> bool:
        return self in (StudyStatus.SUCCEEDED, StudyStatus.FAILED, StudyStatus.CANCELLED, StudyStatus.INTERRUPTED)

    @property
    def is_resumable(self) -> bool:
        """``POST /studies/{id}/resume`` takes the study back to RUNNING from this status."""
        return self in (StudyStatus.FAILED, StudyStatus.CANCELLED, StudyStatus.INTERRUPTED)

    @property
    def is_active(self) -> bool:
        return not self.is_terminal


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_study_id() -> str:
    """12 lowercase hex chars: short enough for Ray submission ids, Tune folder names and URLs."""
    return secrets.token_hex(6)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=StudyStatus.PENDING.value)
    spec_json: Mapped[str] = mapped_column(Text)  # the spec as given (canonical JSON)
    num_trials: Mapped[int] = mapped_column(Integer)  # current target (resume may extend it)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    submission_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # current Ray job
    resume_count: Mapped[int] = mapped_column(Integer, default=0)
    ray_job_status: Mapped[str | None] = mapped_column(String(16), nullable=True)

    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mlflow_parent_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)

    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    api_key_id: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)  # who created it

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    @property
    def spec(self) -> dict[str, Any]:
        return json.loads(self.spec_json)

    @property
    def status_enum(self) -> StudyStatus:
        return StudyStatus(self.status)


def _aware(dt: datetime | None) -> datetime | None:
    """SQLite drops tzinfo; everything stored here is UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


@event.listens_for(Study, "load")
def _fix_tz(target: Study, _context: Any) -> None:
    for attr in ("created_at", "updated_at", "submitted_at", "started_at", "finished_at"):
        setattr(target, attr, _aware(getattr(target, attr)))


def _apply(row: Study, fields: dict[str, Any]) -> None:
    """Set ``fields`` on ``row`` (statuses stored by value) and stamp ``updated_at``."""
    for k, v in fields.items():
        setattr(row, k, v.value if isinstance(v, StudyStatus) else v)
    row.updated_at = utcnow()


class ApiKey(Base):
    """An API key: only its sha256 is stored (service/core/auth.py)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # the key's public id (bsk_<id>_...)
    name: Mapped[str] = mapped_column(String(100), default="")
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@event.listens_for(ApiKey, "load")
def _fix_key_tz(target: ApiKey, _context: Any) -> None:
    target.created_at = _aware(target.created_at)
    target.revoked_at = _aware(target.revoked_at)


class RateBucket(Base):
    """A token bucket of the rate limit (service/api/security.py), shared by every API process."""

    __tablename__ = "rate_buckets"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    updated_s: Mapped[float] = mapped_column(Float)
    granted: Mapped[int] = mapped_column(Integer, default=0)


class StoreLock(Base):
    """Rows updated first in a transaction to serialise it across processes (``active_studies``)."""

    __tablename__ = "store_locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    n: Mapped[int] = mapped_column(Integer, default=0)


ACTIVE_STATUSES = tuple(st.value for st in StudyStatus if st.is_active)


class ActiveLimitReached(Exception):
    """Creating / resuming a study would make more than ``limit`` studies active."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} studies are active (limit {limit})")
        self.active = active
        self.limit = limit


class StudyNotFound(LookupError):
    def __init__(self, study_id: str) -> None:
        super().__init__(f"no study with id {study_id!r}")
        self.study_id = study_id


class IdempotencyConflict(Exception):
    """Same Idempotency-Key, different body."""


MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK_KEY = 0x626F6E6E  # pg_advisory_xact_lock key of the store's migrations ("bonn")
ACTIVE_LOCK = "active_studies"


class StudyStore:
    def __init__(self, url: str) -> None:
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn: Any, _rec: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock = threading.Lock()  # in-process; across processes: the store_locks row
        self._takes = 0

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest Alembic revision (service/core/migrations). A
        database made before migrations existed (tables, no ``alembic_version``) is stamped ``0001``
        first. Concurrent callers on Postgres wait on an advisory lock; on SQLite on the write lock."""
        from alembic import command
        from alembic.config import Config
        from sqlalchemy import inspect

        with self._lock, self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            elif conn.dialect.name == "sqlite":  # take SQLite's write lock before looking at the tables
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            cfg = Config()
            cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
            cfg.attributes["connection"] = conn
            tables = set(inspect(conn).get_table_names())
            if "studies" in tables and "alembic_version" not in tables:
                command.stamp(cfg, "0001")
            command.upgrade(cfg, "head")

    create_all = migrate  # the name callers used before migrations

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self._sessions() as s:
            s.execute(select(1))

    # -- reads ------------------------------------------------------------------------------------
    def get(self, study_id: str) -> Study:
        with self._sessions() as s:
            row = s.get(Study, study_id)
            if row is None:
                raise StudyNotFound(study_id)
            return row

    def get_by_idempotency_key(self, key: str) -> Study | None:
        with self._sessions() as s:
            return s.scalars(select(Study).where(Study.idempotency_key == key)).first()

    def list(
        self, *, status: str | None = None, limit: int = 50, offset: int = 0, api_key_id: str | None = None
    ) -> tuple[list[Study], int]:
        """Newest first; ``api_key_id``: only the studies that key created."""
        with self._sessions() as s:
            q = select(Study)
            cq = select(func.count()).select_from(Study)
            if status:
                q = q.where(Study.status == status)
                cq = cq.where(Study.status == status)
            if api_key_id is not None:
                q = q.where(Study.api_key_id == api_key_id)
                cq = cq.where(Study.api_key_id == api_key_id)
            total = s.scalar(cq) or 0
            rows = s.scalars(q.order_by(Study.created_at.desc(), Study.id).limit(limit).offset(offset)).all()
            return list(rows), int(total)

    def active(self) -> list[Study]:
        with self._sessions() as s:
            q = select(Study).where(Study.status.in_(ACTIVE_STATUSES))
            return list(s.scalars(q).all())

    def count_active(self) -> int:
        with self._sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Study).where(Study.status.in_(ACTIVE_STATUSES))) or 0)

    @staticmethod
    def _check_active(s: Any, max_active: int | None) -> None:
        """Count the active studies. Callers first update the ``store_locks`` row (:meth:`_lock_active`):
        that holds a row lock on Postgres and SQLite's write lock until their commit, so the count and
        the insert or transition after it are one step for every API process sharing the database."""
        if max_active is None:
            return
        n = int(s.scalar(select(func.count()).select_from(Study).where(Study.status.in_(ACTIVE_STATUSES))) or 0)
        if n >= max_active:
            raise ActiveLimitReached(n, max_active)

    @staticmethod
    def _lock_active(s: Any) -> None:
        s.execute(update(StoreLock).where(StoreLock.name == ACTIVE_LOCK).values(n=StoreLock.n + 1))

    # -- API keys (hashes only) ---------------------------------------------------------------------
    def add_api_key(self, key_id: str, sha256: str, name: str = "") -> ApiKey:
        row = ApiKey(id=key_id, name=name, sha256=sha256, created_at=utcnow())
        with self._sessions() as s:
            s.add(row)
            s.commit()
            return row

    def get_api_key(self, key_id: str) -> ApiKey | None:
        with self._sessions() as s:
            return s.get(ApiKey, key_id)

    def list_api_keys(self, *, include_revoked: bool = True) -> list[ApiKey]:
        with self._sessions() as s:
            q = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
            if not include_revoked:
                q = q.where(ApiKey.revoked_at.is_(None))
            return list(s.scalars(q).all())

    def revoke_api_key(self, key_id: str) -> ApiKey | None:
        with self._sessions() as s:
            row = s.get(ApiKey, key_id)
            if row is not None and row.revoked_at is None:
                row.revoked_at = utcnow()
                s.commit()
            return row

    # -- writes -----------------------------------------------------------------------------------
    def create(
        self,
        *,
        name: str,
        spec_json: str,
        num_trials: int,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        study_id: str | None = None,
        max_active: int | None = None,
        api_key_id: str | None = None,
    ) -> tuple[Study, bool]:
        """Insert a PENDING study; returns ``(row, created)``. With an idempotency key already used:
        ``(existing row, False)`` if the request hash matches, :class:`IdempotencyConflict` otherwise.
        With ``max_active``: :class:`ActiveLimitReached` if that many studies are already active (count
        and insert under the ``store_locks`` row: one step across API processes). ``api_key_id``: the
        key that created it."""
        row = Study(
            id=study_id or new_study_id(),
            name=name,
            status=StudyStatus.PENDING.value,
            spec_json=spec_json,
            num_trials=num_trials,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            api_key_id=api_key_id,
            created_at=utcnow(),
            updated_at=utcnow(),
        )
        with self._lock, self._sessions() as s:
            if max_active is not None:  # the lock row first, then read (SQLite: no write after a read)
                self._lock_active(s)
            replay = self._replay(s, idempotency_key, request_hash)
            if replay is not None:
                return replay, False
            self._check_active(s, max_active)
            s.add(row)
            try:
                s.commit()
            except IntegrityError:  # an identical key committed between our read and our insert
                s.rollback()
                replay = self._replay(s, idempotency_key, request_hash)
                if replay is None:
                    raise
                return replay, False
            return row, True

    @staticmethod
    def _replay(s: Session, idempotency_key: str | None, request_hash: str | None) -> Study | None:
        """The study an Idempotency-Key already made (None: the key is new or absent);
        :class:`IdempotencyConflict` when it was made by a different request."""
        if idempotency_key is None:
            return None
        existing = s.scalars(select(Study).where(Study.idempotency_key == idempotency_key)).first()
        if existing is not None and existing.request_hash != request_hash:
            raise IdempotencyConflict(idempotency_key)
        return existing

    def update(self, study_id: str, **fields: Any) -> Study:
        with self._sessions() as s:
            row = s.get(Study, study_id)
            if row is None:
                raise StudyNotFound(study_id)
            _apply(row, fields)
            s.commit()
            return row

    def transition(
        self,
        study_id: str,
        expect: set[StudyStatus],
        *,
        expect_submission: str | None | bool = False,
        max_active: int | None = None,
        **fields: Any,
    ) -> Study | None:
        """Update only if the current status is in ``expect`` and, when ``expect_submission`` is given
        (a str or None), the row still points at that submission (compare-and-set, one transaction).
        Returns None when the row did not match. With ``max_active`` (a transition that makes the
        study active): :class:`ActiveLimitReached` if that many studies are active already."""
        with self._lock, self._sessions() as s:
            if max_active is not None:
                self._lock_active(s)
            row = s.get(Study, study_id, with_for_update=True)
            if row is None:
                raise StudyNotFound(study_id)
            if StudyStatus(row.status) not in expect:
                return None
            if expect_submission is not False and row.submission_id != expect_submission:
                return None
            self._check_active(s, max_active)
            _apply(row, fields)
            s.commit()
            return row

    # -- rate limit (shared by every API process) -------------------------------------------------------
    def take_token(self, name: str, rate: float, burst: int, now: float) -> float:
        """Take a token from bucket ``name`` (``rate`` tokens/s, at most ``burst``; ``now``: epoch
        seconds): 0.0 if one was taken, else the seconds until one is back. One upsert statement, so
        concurrent takes from several processes never hand out the same token."""
        t = RateBucket.__table__
        elapsed = case((t.c.updated_s < now, now - t.c.updated_s), else_=0.0)
        refilled = t.c.tokens + elapsed * rate
        full = case((refilled > float(burst), float(burst)), else_=refilled)
        ins = (_pg_insert if self.engine.dialect.name == "postgresql" else _sqlite_insert)(t).values(
            name=name, tokens=float(burst) - 1.0, updated_s=now, granted=1
        )
        stmt = ins.on_conflict_do_update(
            index_elements=[t.c.name],
            set_={
                "tokens": case((full >= 1.0, full - 1.0), else_=full),
                "granted": case((full >= 1.0, 1), else_=0),
                "updated_s": case((t.c.updated_s < now, now), else_=t.c.updated_s),
            },
        ).returning(t.c.tokens, t.c.granted)
        with self._sessions() as s:
            tokens, granted = s.execute(stmt).one()
            s.commit()
        self._takes += 1
        if self._takes % 1000 == 0:  # forget buckets idle long enough to be full again
            with self._sessions() as s:
                s.execute(RateBucket.__table__.delete().where(RateBucket.updated_s < now - burst / max(rate, 1e-9) - 60))
                s.commit()
        return 0.0 if granted else (1.0 - float(tokens)) / rate


def _pg_insert(table: Any) -> Any:
    from sqlalchemy.dialects.postgresql import insert

    return insert(table)


def _sqlite_insert(table: Any) -> Any:
    from sqlalchemy.dialects.sqlite import insert

    return insert(table)
