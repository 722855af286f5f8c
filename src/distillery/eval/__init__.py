"""Evaluation: accuracy, teacher-student agreement, calibration; generated images (Fréchet distance)."""

from distillery.eval.generative import confident_coverage, frechet_distance
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
    "confident_coverage",
    "expected_calibration_error",
    "frechet_distance",
    "nll",
    "predict_logits",
]
