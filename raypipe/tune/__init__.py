"""Hyperparameter sweeps: Ray Tune over the exact training code path of ``raypipe train``.

The package: :mod:`~raypipe.tune.space` (search space, the base config of every trial, the sweep fingerprint),
:mod:`~raypipe.tune.sweep` (the trial driver, the Tuner, the CLI stage), :mod:`~raypipe.tune.results` (trial
summaries, the best trial and its training config), :mod:`~raypipe.tune.tracker` (the parent MLflow run) and
:mod:`~raypipe.tune.asha` (ASHA that survives a resume); the table and plot are drawn by :mod:`raypipe.reports`.
Names are re-exported here: Tune pickles the scheduler and the trainable of a running sweep by their import
path, and sweeps started before the split resume through ``raypipe.tune.ResumableASHA`` / ``run_trial``.

Why this shape (Ray 2.60, Train V2):

- Tune runs a small *function* trainable per trial (the "trial driver"). It turns the trial's sampled values
  into dotted-key overrides of the base config, then builds and fits a TorchTrainer through
  :func:`raypipe.train.build_trainer` with a :class:`~ray.tune.integration.ray_train.TuneReportCallback`. Each
  trial is therefore a complete DDP training run, identical to ``raypipe train`` with those overrides; passing a
  trainer object to the Tuner is deprecated in Train V2 and is not used.
- The driver reserves (by default) no CPU: the Train V2 controller takes 0 CPUs and the worker group asks for
  its own resources, so a reserved driver CPU would only starve the trial's own workers.
- MLflow: one parent run per sweep (search space, best result, summary table, plot, best config) and one child
  run per trial, created by :mod:`raypipe.tracking` on rank 0 because the trial config carries
  ``tracking.parent_run_id``. The parent run is found again by the sweep's path on resume, so a resumed sweep
  keeps one parent with all its children.
- Resume: the sweep lives in ``<storage_path>/<name>``; running the same sweep again restores it with
  ``Tuner.restore`` (finished trials are kept, not re-run). A failing trial is recorded in the result grid
  and the summary; it never stops the sweep.
"""

from raypipe.reports import trials_csv as table_csv
from raypipe.reports import trials_table as format_table
from raypipe.tune.asha import ASHA_STATE_NAME, ResumableASHA
from raypipe.tune.results import (
    BEST_CONFIG_NAME,
    PLOT_NAME,
    TABLE_NAME,
    SweepResult,
    TrialSummary,
    best_training_config,
    pick_best,
    summarize_trials,
)
from raypipe.tune.space import (
    apply_params,
    expected_trials,
    fingerprint,
    max_epochs_of,
    portable_base,
    sample_values,
    sweep_metric,
    sweep_path,
    to_param_space,
    trial_run_name,
    validate_search_space,
)
from raypipe.tune.sweep import run, run_trial, tune
from raypipe.tune.tracker import SWEEP_FINGERPRINT_TAG, SWEEP_PATH_TAG, TRIAL_TAG, SweepTracker

__all__ = [
    "ASHA_STATE_NAME", "BEST_CONFIG_NAME", "PLOT_NAME", "SWEEP_FINGERPRINT_TAG", "SWEEP_PATH_TAG", "TABLE_NAME",
    "TRIAL_TAG", "ResumableASHA", "SweepResult", "SweepTracker", "TrialSummary", "apply_params",
    "best_training_config", "expected_trials", "fingerprint", "format_table", "max_epochs_of", "pick_best",
    "portable_base", "run", "run_trial", "sample_values", "summarize_trials", "sweep_metric", "sweep_path",
    "table_csv", "to_param_space", "trial_run_name", "tune", "validate_search_space",
]
