"""Teacher sources behind one protocol (see :mod:`distillery.teachers.base`)."""

from distillery.teachers.base import BaseTeacher, Teacher, TeacherOutput
from distillery.teachers.cached import CachedTeacher, OutputCacheTeacher
from distillery.teachers.frozen import FrozenTeacher
from distillery.teachers.multi import MultiTeacher
from distillery.teachers.store import (
    DamagedTeacherError,
    TeacherStore,
    config_hash,
    teacher_key,
    training_code_version,
)

__all__ = [
    "BaseTeacher",
    "CachedTeacher",
    "DamagedTeacherError",
    "FrozenTeacher",
    "MultiTeacher",
    "OutputCacheTeacher",
    "Teacher",
    "TeacherOutput",
    "TeacherStore",
    "config_hash",
    "teacher_key",
    "training_code_version",
]
