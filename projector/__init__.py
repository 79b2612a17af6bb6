"""Events → read model (SQLAlchemy Core; SQLite by default, PostgreSQL by URL)."""

from projector.database import create_engine, create_schema
from projector.readside import ImageRecord, JobRecord, ReadModel
from projector.service import Projector, ProjectorConflict, rebuild

__all__ = [
    "ImageRecord",
    "JobRecord",
    "Projector",
    "ProjectorConflict",
    "ReadModel",
    "create_engine",
    "create_schema",
    "rebuild",
]
