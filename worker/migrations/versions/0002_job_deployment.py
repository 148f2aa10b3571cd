"""Jobs keep the summary of the deployed check: INT8 kernels on ONNX Runtime, latency vs FP32.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qt_jobs") as batch:
        batch.add_column(sa.Column("deployment", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("qt_jobs") as batch:
        batch.drop_column("deployment")
