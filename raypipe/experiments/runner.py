"""``raypipe experiment NAME``: every row of a paper's tables as Ray Tune trials, then the tables.

Order of work, so that nothing runs on a bad file: (1) every runnable row's config is validated; (2) the feature
shards are found (``--data``) or, at ``--scale tiny``, generated once into ``<out>/../tiny_data``; (3) every row's
model is built on the meta device with the shards' dims; only then (4) the missing (row, seed) trials run as Tune
trials, concurrently up to the CPUs (or GPUs) Ray has; (5) the tables are written (Markdown, JSON, PNG) and logged
as one MLflow parent run with a child per row.

Resuming: each finished trial writes ``<out>/trials/<key>.json`` atomically, where ``key`` hashes the row's whole
training config and seed (:func:`raypipe.experiments.spec.trial_key`). A rerun of a killed experiment runs only
the keys without a file; a row whose config changed gets a new key and trains again; identical rows of several
tables (DMAFNet's full model is in Tables 2-5) share one trial. Why files and not ``Tuner.restore``: a restore
replays the old experiment's trial list, so it cannot take a changed row or a new seed, and a result file is
what the table is built from anyway.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from raypipe.config import ConfigError, RaypipeConfig, config_to_dict
from raypipe.data import DataError, DataSpec
from raypipe.experiments.spec import (
    ExperimentSpec,
    Scale,
    load_experiment,
    parse_user_overrides,
    pretrain_config,
    row_config,
    row_error,
    runnable_rows,
    trial_key,
    validate_rows,
)

log = logging.getLogger(__name__)

DEFAULT_OUT = "raypipe_runs/experiments"


# ------------------------------------------------------------------------------------------------ data


def tiny_data(cfg: RaypipeConfig, root: Path, videos: int) -> str:
    """A generated corpus (real mp4, 6 classes, short clips) embedded with the test preset's tiny encoders, made
    once under ``root`` and reused by every experiment (a marker file says the embedding finished)."""
    from raypipe.config import CorpusConfig, load_config
    from raypipe.corpus import generate_corpus
    from raypipe.embed.pipeline import embed_videos

    features, done = root / "features", root / "features.done"
    if done.exists():
        return str(features)
    corpus = root / "corpus"
    info = generate_corpus(CorpusConfig(out=str(corpus), videos=videos, seed=0, num_level1=3, num_level2_per_level1=2,
                                        noise_rate=0.1, max_duration_s=5.0, long_fraction=0.0, workers=2))
    ecfg = load_config("test", [f"embed.source.uri={info.videos_dir}", f"embed.source.annotations={info.annotations_path}",
                                f"embed.output={features}"])
    embed_videos(ecfg)
    done.write_text("embedded\n")
    return str(features)


def with_class_names(cfg: RaypipeConfig, data: str | None, out: Path) -> RaypipeConfig:
    """``cfg`` with ``eval.class_names`` (what zero-shot rows embed) defaulting to the generated corpus's
    ``class_names.txt``: the one made beside the tiny features (``--data`` of that layout, or the corpus this
    command generates). Other data: ``--set eval.class_names=FILE``."""
    from raypipe.io import fs as rfs

    if cfg.eval.class_names or cfg.label.class_names or (data is not None and rfs.is_remote(data)):
        return cfg
    features = Path(data) if data is not None else out.parent / "tiny_data" / "features"
    names = features.resolve().parent / "corpus" / "class_names.txt"
    if data is not None and not names.is_file():
        return cfg
    from raypipe.config import validate_config

    data = config_to_dict(cfg)  # only what was set: a nested attribute set on the model would not show in it
    data.setdefault("eval", {})["class_names"] = str(names)
    return validate_config(data)


class Specs:
    """The shards' :class:`DataSpec` per (task, val/test fractions, taxonomy, held-out classes): rows may differ."""

    def __init__(self, uri: str, storage: Any) -> None:
        self.uri, self.storage, self.cache = uri, storage, {}

    def __call__(self, cfg: RaypipeConfig) -> DataSpec:
        from raypipe.data import prepare_data

        t = cfg.train
        key = (t.task, t.val_fraction, t.test_fraction, t.taxonomy, tuple(t.holdout_classes), t.pretrain)
        if key not in self.cache:
            try:
                self.cache[key] = prepare_data(self.uri, task=t.task, val_fraction=t.val_fraction,
                                               test_fraction=t.test_fraction, taxonomy=t.taxonomy, storage=self.storage,
                                               holdout=t.holdout_classes, keep_unlabelled=t.pretrain)
            except DataError as exc:
                raise ConfigError(f"config error: --data: {exc}") from None
        return self.cache[key]

    def key(self, spec: DataSpec) -> str:
        return (f"{spec.task}-{spec.val_fraction}-{spec.test_fraction}-{len(spec.classes)}-"
                f"{'+'.join(spec.holdout_classes)}{'-unlabelled' if spec.keep_unlabelled else ''}")


# ------------------------------------------------------------------------------------------------ planning


def plan_trials(base: dict[str, Any], exp: ExperimentSpec, scale: Scale, seeds: list[int], specs: Specs,
                tables: list[str] | None, user: dict[str, Any] | None = None) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str, int], str]]:
    """``(trials by key, key of every (table, row, seed))``; a trial carries every corruption its rows' tables
    score, so one trained model serves each table it appears in."""
    trials: dict[str, dict[str, Any]] = {}
    keys: dict[tuple[str, str, int], str] = {}
    for table, row in runnable_rows(exp, tables):
        for seed in seeds:
            cfg = row_config(base, exp, table, row, scale, seed=seed, data_uri=specs.uri, user=user)
            pre = pretrain_config(cfg, exp, table, row)
            key = trial_key(cfg, pre)
            plan = trials.setdefault(key, {"key": key, "seed": seed, **_stage_plan(cfg, specs), "corruptions": {},
                                           "rows": [], "pretrain": _stage_plan(pre, specs) if pre else None})
            plan["rows"].append(f"{table.name}/{row.name}")
            for col in table.corruptions:
                if col.pending is not None:
                    continue
                seen = plan["corruptions"].setdefault(col.name, col.config().model_dump())
                if seen != col.config().model_dump():
                    raise row_error(exp, table, row, f"corruption {col.name!r} is defined twice with other options")
            keys[(table.name, row.name, seed)] = key
    return trials, keys


def _stage_plan(cfg: RaypipeConfig, specs: Specs) -> dict[str, Any]:
    """What a trial needs of one training stage: its config, data spec (and the key of its splits), model kwargs."""
    from raypipe.train import model_kwargs, resolve_lr, resolve_schedule

    spec = specs(cfg)
    cfg = resolve_schedule(resolve_lr(cfg), spec.num_train, workers=1)  # a trial trains in one process
    return {"cfg": config_to_dict(cfg), "spec": spec.to_dict(), "spec_key": specs.key(spec),
            "kwargs": model_kwargs(cfg, spec)}


def result_path(out: Path, key: str) -> Path:
    return out / "trials" / f"{key}.json"


def _write_result(out: Path, plan: dict[str, Any], result: dict[str, Any]) -> None:
    path = result_path(out, plan["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    doc = {"key": plan["key"], "seed": plan["seed"], "rows": plan["rows"], "config": plan["cfg"], **result}
    if plan.get("pretrain"):
        doc["pretrain_config"] = plan["pretrain"]["cfg"]
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    tmp.replace(path)  # atomic: a killed trial leaves no result, so the rerun trains it


# ------------------------------------------------------------------------------------------------ Tune


def _tune_trial(config: dict[str, Any], *, plans: dict[str, Any], data: dict[str, Any], out: str, threads: int) -> None:
    """One Tune trial: train the planned row/seed (raypipe.experiments.trial), write its result file."""
    from ray import tune

    from raypipe.experiments.trial import PretrainStage, run_trial

    plan = plans[config["key"]]
    cfg = RaypipeConfig.model_validate(plan["cfg"])
    spec = DataSpec.from_dict(plan["spec"])
    pre = plan.get("pretrain")
    stage = None if pre is None else PretrainStage(
        RaypipeConfig.model_validate(pre["cfg"]), DataSpec.from_dict(pre["spec"]), pre["kwargs"], data[pre["spec_key"]])
    result = run_trial(cfg, spec, plan["kwargs"], data[plan["spec_key"]], plan["corruptions"], threads=threads,
                       report=tune.report, pretrain_stage=stage)
    _write_result(Path(out), plan, result)
    tune.report({"done": 1.0, **{f"test/{k}": v for k, v in result["test"].items()}})


def run_trials(cfg: RaypipeConfig, todo: list[str], trials: dict[str, Any], specs: Specs, out: Path,
               exp_name: str) -> list[str]:
    """Run the ``todo`` keys as Tune trials (concurrent up to the cluster's CPUs, or GPUs for GPU rows) -> the keys
    whose trial failed (their rows show as failed; rerun to retry them)."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raypipe.experiments.trial import read_splits
    from raypipe.runtime import ensure_ray, fit_tuner

    ensure_ray(cfg)
    gpu = any(trials[k]["cfg"].get("train", {}).get("use_gpu") is True for k in todo)
    have = ray.cluster_resources()
    slots = int(have.get("GPU", 0)) if gpu else int(have.get("CPU", 1))
    if slots < 1:
        raise ConfigError("config error: train.use_gpu=true but the Ray cluster has no GPU (run --scale paper on a GPU)")
    resources = {"cpu": 1, "gpu": 1} if gpu else {"cpu": 1}
    threads = 1 if not gpu else max(1, int(have.get("CPU", 1)) // slots)
    data = {specs.key(s): read_splits(s) for s in specs.cache.values()}
    log.info("experiment %s: %d trials to run, up to %d at once (%s each)", exp_name, len(todo), slots, resources)
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, plans={k: trials[k] for k in todo}, data=data, out=str(out), threads=threads),
        resources)
    tuner = tune.Tuner(
        trainable,
        param_space={"key": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=slots), reuse_actors=True),
        run_config=tune.RunConfig(name=f"{exp_name}-{time.strftime('%Y%m%dT%H%M%S')}", storage_path=str(out / "tune"),
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False), verbose=0),
    )
    fit_tuner(tuner)
    return [k for k in todo if not result_path(out, k).exists()]


# ------------------------------------------------------------------------------------------------ the stage


def prepare(cfg: RaypipeConfig, exp: ExperimentSpec, scale: Scale, data: str | None, out: Path,
            tables: list[str] | None, user: dict[str, Any] | None = None) -> Specs:
    """Checks 1-3 of the module docstring (raises ``ConfigError`` before any trial) -> the data's specs."""
    from raypipe.runtime import ensure_ray

    base = config_to_dict(cfg)
    if scale not in exp.scales:
        raise ConfigError(f"config error: --scale: experiment {exp.name} has no {scale!r} scale "
                          f"(has: {', '.join(exp.scales)})")
    unknown = sorted(set(tables or []) - {t.name for t in exp.tables})
    if unknown:
        raise ConfigError(f"config error: --tables: experiment {exp.name} has no table {unknown} "
                          f"(tables: {', '.join(t.name for t in exp.tables)})")
    for table, row in runnable_rows(exp, tables):
        row_config(base, exp, table, row, scale, user=user)
    if data is None and scale != "tiny":
        raise ConfigError("config error: --data: --scale paper needs the feature shards of the paper's dataset")
    if data is None:
        ensure_ray(cfg)
        data = tiny_data(cfg, out.parent / "tiny_data", exp.scales[scale].videos)
    from raypipe.io import fs as rfs

    uri = data if rfs.is_remote(data) else str(Path(data).resolve())
    specs = Specs(uri, cfg.storage)
    validate_rows(base, exp, scale, specs, tables, user)
    return specs


def run(cfg: RaypipeConfig, *, name: str, scale: Scale = "tiny", seeds: list[int] | None = None,
        data: str | None = None, out: str | None = None, tables: list[str] | None = None,
        overrides: list[str] | None = None) -> int:
    """``raypipe experiment``: 0 when every runnable row has all its seeds, 1 when a trial failed (rerun to retry
    only those); a bad experiment file or row is a ``ConfigError`` (exit code 2) before any trial."""
    from raypipe.experiments.report import write_outputs

    t0 = time.perf_counter()
    exp = load_experiment(name)
    seeds = list(seeds or exp.scales.get(scale, exp.scales[next(iter(exp.scales))]).seeds)
    out_dir = Path(out or f"{DEFAULT_OUT}/{exp.name}-{scale}").resolve()
    user = parse_user_overrides(overrides)
    cfg = with_class_names(cfg, data, out_dir)
    specs = prepare(cfg, exp, scale, data, out_dir, tables, user)
    trials, keys = plan_trials(config_to_dict(cfg), exp, scale, seeds, specs, tables, user)
    todo = [k for k in trials if not result_path(out_dir, k).exists()]
    log.info("experiment %s (%s): %d (row, seed) pairs, %d distinct trials, %d already done, %d to run",
             exp.name, scale, len(keys), len(trials), len(trials) - len(todo), len(todo))
    failed = run_trials(cfg, todo, trials, specs, out_dir, exp.name) if todo else []
    results = {k: json.loads(result_path(out_dir, k).read_text()) for k in trials if result_path(out_dir, k).exists()}
    paths = write_outputs(cfg, exp, scale=scale, seeds=seeds, keys=keys, results=results, out=out_dir,
                          data=specs.uri, ran=todo, seconds=time.perf_counter() - t0, tables=tables)
    log.info("experiment %s: tables in %s", exp.name, ", ".join(str(p) for p in paths))
    if failed:
        log.error("experiment %s: %d trial(s) failed (%s); rerun the command to retry only them", exp.name,
                  len(failed), ", ".join(sorted({r for k in failed for r in trials[k]["rows"]})))
        return 1
    return 0
