"""Teacher files (export/load) and the frozen TeacherBank."""

from amalgam.teachers.bank import TeacherBank, TeacherOutputs, load_teacher_bank
from amalgam.teachers.io import (
    TeacherMeta,
    build_teacher,
    export_teacher,
    module_hash,
    read_weights,
    resolve_meta,
    state_dict_hash,
)

__all__ = [
    "TeacherBank",
    "TeacherMeta",
    "TeacherOutputs",
    "build_teacher",
    "export_teacher",
    "load_teacher_bank",
    "module_hash",
    "read_weights",
    "resolve_meta",
    "state_dict_hash",
]
