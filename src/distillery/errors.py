"""Errors a user can fix. The CLI prints their message (no traceback) and exits with code 2."""


class DistilleryError(Exception):
    """A problem in the user's input or environment; the message names it and says how to fix it."""

    exit_code = 2


class ConfigError(DistilleryError):
    """An invalid run configuration (unknown key, wrong type, conflicting fields, bad override)."""


class DataNotFoundError(DistilleryError):
    """A dataset is not on this machine and could not be downloaded."""


class NonFiniteLossError(DistilleryError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class TeacherUnavailableError(DistilleryError):
    """The teacher could not answer (a teacher server down, hanging or answering garbage past its retries);
    training stopped before the step that needed it, and the last checkpoint is kept."""


class RunInterrupted(DistilleryError):
    """The user pressed Ctrl-C; a checkpoint of the last completed step was written."""

    exit_code = 130
