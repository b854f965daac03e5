"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import schema_for_migration

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    s = schema_for_migration()
    ${upgrades if upgrades else "op.execute(f'...')"}


def downgrade() -> None:
    s = schema_for_migration()
    ${downgrades if downgrades else "op.execute(f'...')"}
