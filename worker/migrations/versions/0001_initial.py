"""Tokens, jobs, files (uploads and artifacts), leases.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qt_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_qt_tokens_token_hash", "qt_tokens", ["token_hash"], unique=True)
    op.create_table(
        "qt_jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("qt_tokens.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("model_source", sa.String(400), nullable=False),
        sa.Column("calibration_source", sa.String(400), nullable=False),
        sa.Column("evaluation_source", sa.String(400), nullable=False),
        sa.Column("parallelism", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("trials", sa.Integer, nullable=False),
        sa.Column("evaluations", sa.Integer, nullable=False),
        sa.Column("best_score", sa.Float),
        sa.Column("best_drop", sa.Float),
        sa.Column("best_coverage", sa.Float),
        sa.Column("best_met", sa.Boolean),
        sa.Column("baseline", sa.Float),
        sa.Column("score", sa.Float),
        sa.Column("drop", sa.Float),
        sa.Column("coverage", sa.Float),
        sa.Column("met", sa.Boolean),
        sa.Column("deployed_score", sa.Float),
        sa.Column("reason", sa.Text),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_qt_jobs_owner_id", "qt_jobs", ["owner_id"])
    op.create_index("ix_qt_jobs_status", "qt_jobs", ["status"])
    op.create_table(
        "qt_files",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("qt_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_qt_files_job_id", "qt_files", ["job_id"])
    op.create_table(
        "qt_leases",
        sa.Column("job_id", sa.Integer, sa.ForeignKey("qt_jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("slot", sa.Integer, primary_key=True),
        sa.Column("worker_id", sa.String(100)),
        sa.Column("expires_at", sa.Float),
        sa.Column("claims", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("qt_leases")
    op.drop_table("qt_files")
    op.drop_index("ix_qt_jobs_status", "qt_jobs")
    op.drop_index("ix_qt_jobs_owner_id", "qt_jobs")
    op.drop_table("qt_jobs")
    op.drop_index("ix_qt_tokens_token_hash", "qt_tokens")
    op.drop_table("qt_tokens")
