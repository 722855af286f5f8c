"""Teacher sources behind one protocol (see :mod:`distillery.teachers.base`)."""

from distillery.teachers.base import BaseTeacher, Teacher, TeacherOutput
from distillery.teachers.cached import CachedTeacher, OutputCacheTeacher
from distillery.teachers.cross_tokenizer import CrossTokenizerTeacher
from distillery.teachers.frozen import FrozenTeacher
from distillery.teachers.multi import MultiTeacher
from distillery.teachers.self_context import SelfContextTeacher
from distillery.teachers.server import ServerError, ServerTeacher, TeacherClient
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
    "CrossTokenizerTeacher",
    "DamagedTeacherError",
    "FrozenTeacher",
    "MultiTeacher",
    "OutputCacheTeacher",
    "SelfContextTeacher",
    "ServerError",
    "ServerTeacher",
    "Teacher",
    "TeacherClient",
    "TeacherOutput",
    "TeacherStore",
    "config_hash",
    "teacher_key",
    "training_code_version",
]
