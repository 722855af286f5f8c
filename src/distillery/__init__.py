"""distillery: knowledge distillation and self-distillation for PyTorch.

The public API in one screen::

    import distillery as ds

    cfg = ds.load_config("digits-kd", ["seeds=[0,1]"])    # a shipped recipe, with overrides
    result = ds.run(cfg)                                   # teacher, baseline and distilled student
    print(result.summary["paired_distilled_minus_baseline"]["accuracy"])
    ds.cache_outputs(ds.load_config("lm-kd-cached"))        # a teacher's outputs, computed once

or, with your own modules, the loop alone::

    teacher = ds.FrozenTeacher(my_teacher)
    objective = ds.Objective({"ce": ds.losses.CrossEntropyLoss(), "kd": ds.losses.ForwardKLLoss(4.0)})
    ds.fit(student, train_set, objective, ds.TrainConfig(steps=1000), teacher=teacher)
"""

from distillery import functional, losses
from distillery.config import RunConfig, load_config
from distillery.errors import ConfigError, DataNotFoundError, DistilleryError, NonFiniteLossError
from distillery.experiment import RunResult, cache_outputs, evaluate_run, run
from distillery.losses import Objective
from distillery.teachers import (
    CachedTeacher,
    CrossTokenizerTeacher,
    FrozenTeacher,
    MultiTeacher,
    OutputCacheTeacher,
    SelfContextTeacher,
    ServerTeacher,
    Teacher,
    TeacherClient,
    TeacherOutput,
)
from distillery.train import FitResult, TrainConfig, fit

__version__ = "0.1.0"

__all__ = [
    "CachedTeacher",
    "ConfigError",
    "CrossTokenizerTeacher",
    "DataNotFoundError",
    "DistilleryError",
    "FitResult",
    "FrozenTeacher",
    "MultiTeacher",
    "NonFiniteLossError",
    "Objective",
    "OutputCacheTeacher",
    "RunConfig",
    "RunResult",
    "SelfContextTeacher",
    "ServerTeacher",
    "Teacher",
    "TeacherClient",
    "TeacherOutput",
    "TrainConfig",
    "cache_outputs",
    "evaluate_run",
    "fit",
    "functional",
    "load_config",
    "losses",
    "run",
]
