"""0002: ``studies.api_key_id`` (the key that created a study), ``rate_buckets`` (per-key token buckets
shared by every API process), ``store_locks`` (the row that serialises active-study counts)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("api_key_id", sa.String(16), nullable=True))
        batch.create_index("ix_studies_api_key_id", ["api_key_id"])
    op.create_table(
        "rate_buckets",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("updated_s", sa.Float, nullable=False),  # epoch seconds of the last take
        sa.Column("granted", sa.Integer, nullable=False, server_default="0"),  # 1: the last take got a token
    )
    locks = op.create_table(
        "store_locks",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("n", sa.Integer, nullable=False, server_default="0"),
    )
    op.bulk_insert(locks, [{"name": "active_studies", "n": 0}])


def downgrade() -> None:
    op.drop_table("store_locks")
    op.drop_table("rate_buckets")
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_api_key_id")
        batch.drop_column("api_key_id")
