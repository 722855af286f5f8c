"""Evaluation: accuracy, teacher-student agreement, calibration."""

from distillery.eval.metrics import (
    accuracy,
    agreement,
    classification_metrics,
    expected_calibration_error,
    nll,
    predict_logits,
)

__all__ = [
    "accuracy",
    "agreement",
    "classification_metrics",
    "expected_calibration_error",
    "nll",
    "predict_logits",
]
