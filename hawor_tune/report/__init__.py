"""The final-retrain report: figures (PNG), hyperparameter importance and ``report.md`` from plain data."""

from hawor_tune.report.figures import (
    BONES,
    JOINT_NAMES,
    draw_skeleton,
    pareto_front_points,
    plot_camera_trajectory,
    plot_importance,
    plot_params_vs_metric,
    plot_pareto_front,
    plot_per_finger,
    plot_skeleton_overlays,
    plot_training_curves,
    plot_trial_curves,
    plot_wrist_trajectories,
)
from hawor_tune.report.importance import hyperparameter_importance
from hawor_tune.report.markdown import write_report

__all__ = ["BONES", "JOINT_NAMES", "draw_skeleton", "hyperparameter_importance", "pareto_front_points",
           "plot_camera_trajectory", "plot_importance", "plot_params_vs_metric", "plot_pareto_front",
           "plot_per_finger", "plot_skeleton_overlays", "plot_trial_curves", "plot_training_curves",
           "plot_wrist_trajectories", "write_report"]
