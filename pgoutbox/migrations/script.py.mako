"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

from alembic import op

from pgoutbox.migrations import execute_script, schema_for_migration

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    s = schema_for_migration()
    ${upgrades if upgrades else "execute_script(f'...')"}
    # Every revision keeps the in-schema marker that workers and `pgoutbox db check` read.
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{revision}'")


def downgrade() -> None:
    s = schema_for_migration()
    ${downgrades if downgrades else "execute_script(f'...')"}
    op.execute(f"UPDATE {s}.schema_revision SET revision = '{down_revision}'")
