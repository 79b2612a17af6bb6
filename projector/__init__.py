"""Events → read model (SQLAlchemy Core; SQLite by default, PostgreSQL by URL)."""

from projector.database import Database, create_database, create_schema
from projector.readside import ImageRecord, JobRecord, ReadModel
from projector.service import Projector, ProjectorConflict, rebuild

__all__ = [
    "Database",
    "ImageRecord",
    "JobRecord",
    "Projector",
    "ProjectorConflict",
    "ReadModel",
    "create_database",
    "create_schema",
    "rebuild",
]
