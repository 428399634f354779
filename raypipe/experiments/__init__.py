"""The four papers' experiment tables as data (``raypipe/experiments/<paper>.yaml``) and ``raypipe experiment``.

:mod:`~raypipe.experiments.spec` loads and validates the files and builds each row's config,
:mod:`~raypipe.experiments.trial` trains one (row, seed) in a Tune trial's process,
:mod:`~raypipe.experiments.runner` is the stage, :mod:`~raypipe.experiments.report` writes the tables (rendered
by :mod:`raypipe.experiment_tables`) and their MLflow runs. See docs/EXPERIMENTS.md.
"""

from raypipe.experiments.spec import ExperimentSpec, experiment_names, load_experiment, row_config, validate_rows

__all__ = ["ExperimentSpec", "experiment_names", "load_experiment", "row_config", "validate_rows"]
