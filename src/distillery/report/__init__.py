"""Run reports: tables (console and Markdown) and plots (PNG)."""

from distillery.report.plots import image_grid, learning_curves
from distillery.report.summary import fmt, mean_std, paired_difference

__all__ = ["fmt", "image_grid", "learning_curves", "mean_std", "paired_difference"]
