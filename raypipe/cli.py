"""The ``raypipe`` command: one subcommand per stage, each a thin layer over a typed config.

Every subcommand takes ``-c/--config`` (a preset name from ``raypipe/presets`` or a YAML path) and any number
of ``--set key.path=value`` overrides; its own flags are shorthands for overrides. The config is validated in
full before any stage code (and so any Ray work) runs. Each stage module exposes ``run(cfg) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from raypipe.config import ConfigError, RaypipeConfig, load_config, preset_names
from raypipe.config.paths import missing_paths_message, resolve_paths
from raypipe.logs import log_file, setup_logging

log = logging.getLogger("raypipe")

# subcommand -> (module with ``run(cfg) -> int``, help)
STAGES: dict[str, tuple[str, str]] = {
    "corpus": ("raypipe.corpus", "generate a synthetic demo/test corpus of real videos"),
    "embed": ("raypipe.embed.pipeline", "decode and embed videos into Parquet feature shards"),
    "train": ("raypipe.train", "train a fusion model with Ray Train (DDP), tracked in MLflow"),
    "eval": ("raypipe.evaluate", "evaluate a model on feature shards, optionally under corruption"),
    "tune": ("raypipe.tune", "sweep hyperparameters with Ray Tune, every trial in MLflow"),
    "label": ("raypipe.label", "label a video corpus with a registered model, incrementally"),
    "promote": ("raypipe.promote", "compare champion and challenger on one evaluation set; promote, force or roll back"),
    "nightly": ("raypipe.nightly", "the night's work: embed new videos, optionally retrain + promote, label"),
    "demo": ("raypipe.demo", "run the whole pipeline on a generated corpus (embedded defaults)"),
    "bench": ("raypipe.bench", "run the benchmarks in bench/"),
    "experiment": ("raypipe.experiments.runner", "run a paper's experiment tables (raypipe/experiments/NAME.yaml) as Tune trials"),
    "plan": ("raypipe.capacity", "node counts per cluster.yaml group for N videos a night in H hours, from measured costs"),
    "doctor": ("raypipe.doctor", "show what raypipe sees (Ray, GPUs, MLflow, storage, codecs) and each stage's plan"),
}

# Flags that are shorthands for ``--set``: (subcommand, flag, config key, argparse kwargs).
SHORTHANDS: list[tuple[str, str, str, dict]] = [
    ("corpus", "--out", "corpus.out", {}),
    ("corpus", "--videos", "corpus.videos", {"type": int}),
    ("corpus", "--seed", "corpus.seed", {"type": int}),
    ("corpus", "--bad-inputs", "corpus.bad_inputs", {"action": "store_const", "const": True}),
    ("corpus", "--format", "corpus.format", {}),
    ("embed", "--source", "embed.source.uri", {}),
    ("embed", "--annotations", "embed.source.annotations", {}),
    ("embed", "--output", "embed.output", {}),
    ("train", "--data", "train.data", {}),
    ("train", "--model", "model.name", {}),
    ("train", "--epochs", "train.epochs", {"type": int}),
    ("train", "--run-name", "train.run_name", {}),
    ("eval", "--model-uri", "eval.model_uri", {}),
    ("eval", "--data", "eval.data", {}),
    ("eval", "--split", "eval.split", {}),
    ("eval", "--corruption", "eval.corruption.kind", {}),
    ("eval", "--output", "eval.output", {}),
    ("label", "--source", "embed.source.uri", {}),
    ("label", "--annotations", "embed.source.annotations", {}),
    ("label", "--model-uri", "label.model_uri", {}),
    ("label", "--output", "label.output", {}),
    ("tune", "--name", "tune.name", {}),
    ("promote", "--force", "promote.force", {"action": "store_const", "const": True}),
    ("promote", "--to-version", "promote.to_version", {"type": int}),
    ("promote", "--data", "promote.data", {}),
    ("promote", "--metric", "promote.metric", {}),
    ("nightly", "--night", "nightly.night", {}),
    ("nightly", "--retrain", "nightly.retrain", {"action": "store_const", "const": True}),
    ("nightly", "--source", "embed.source.uri", {}),
    ("nightly", "--annotations", "embed.source.annotations", {}),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypipe", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="stream Ray worker output and library logs to the console (-vv: debug); they always go to the log file",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, (_, help_text) in STAGES.items():
        p = sub.add_parser(stage, help=help_text, description=help_text)
        p.add_argument(
            "-c", "--config", default=None, help=f"preset ({', '.join(preset_names())}) or YAML file"
        )
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config key, e.g. --set train.optim.lr=1e-4 (repeatable)",
        )
        for s, flag, key, kwargs in SHORTHANDS:
            if s == stage:
                p.add_argument(flag, dest=f"short:{key}", default=None, help=f"shorthand for --set {key}=...", **kwargs)
        if stage == "bench":
            p.add_argument("names", nargs="*", help="benchmarks to run (default: all); other options go to each script")
        if stage == "plan":
            _plan_args(p)
        if stage == "experiment":
            _experiment_args(p)
    return parser


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("exp_name", metavar="NAME", help="dmafnet, mfb, bilstm, cavnet (raypipe/experiments/) or a YAML path")
    p.add_argument("--scale", dest="exp_scale", choices=("tiny", "paper"), default="tiny",
                   help="tiny: small models, few epochs, a generated corpus (CPU, minutes); paper: the papers' sizes (GPU)")
    p.add_argument("--seeds", dest="exp_seeds", type=int, nargs="+", default=None, metavar="SEED", help="default: the scale's seeds")
    p.add_argument("--data", dest="exp_data", default=None, metavar="DIR",
                   help="feature shards (default at --scale tiny: generated once under the output folder's parent)")
    p.add_argument("--out", dest="exp_out", default=None, metavar="DIR", help="default: raypipe_runs/experiments/NAME-SCALE")
    p.add_argument("--tables", dest="exp_tables", nargs="+", default=None, metavar="TABLE", help="only these tables (default: all)")


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--videos-per-night", dest="plan_videos", type=int, required=True, metavar="N")
    p.add_argument("--hours", dest="plan_hours", type=float, required=True, metavar="H")
    p.add_argument("--gpu", dest="plan_gpu", default=None, metavar="TYPE",
                   help="encode on the GPU group at this GPU type's assumed rates (T4, A10G, L4, A100, H100)")
    p.add_argument("--costs", dest="plan_costs", action="append", default=None, metavar="JSON",
                   help="bench results or an embed summary.json (repeatable; default: bench/results/)")
    p.add_argument("--durations", dest="plan_durations", default=None, metavar="FILE",
                   help="video durations: corpus.json, a JSON list or one number per line (default: the bench corpus)")
    p.add_argument("--cluster-yaml", dest="plan_cluster_yaml", default=None, help="default: ray.cluster_yaml, else ./cluster.yaml")
    p.add_argument("--utilization", dest="plan_utilization", type=float, default=0.75)
    p.add_argument("--startup-s", dest="plan_startup_s", type=float, default=600.0)
    p.add_argument("--decode-scale", dest="plan_decode_scale", type=float, default=1.0,
                   help="multiply the measured decode cost (e.g. pixels per frame of your videos / the bench corpus')")


def config_from_args(args: argparse.Namespace) -> RaypipeConfig:
    overrides = list(args.overrides)
    for name, value in vars(args).items():
        if name.startswith("short:") and value is not None:
            overrides.append(f"{name[len('short:'):]}={value}")
    # `raypipe demo` is the main job on embedded defaults: without -c it is the demo preset (tiny models, a
    # generated corpus); the other stages default to the plain config (production-sized models).
    source = args.config if args.config is not None or args.stage != "demo" else "demo"
    return load_config(source, overrides)


def _stage_runner(stage: str) -> Callable[..., int]:
    module_name, _ = STAGES[stage]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise NotImplementedError(f"the '{stage}' stage is not built yet ({module_name} is missing)") from None
        raise
    return module.run


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def run_stage(stage: str, runner: Callable[..., int], cfg: RaypipeConfig, **kwargs: object) -> int:
    """Run a stage; whatever it raises ends as one line on the console (traceback in the log file).

    Exit codes: 2 config or resource error (nothing started), 4 stall (watchdog; rerun to resume), 130
    interrupted, 1 anything else (Ray unreachable, unknown registered model, missing bucket, a bug).
    """
    from raypipe.runtime import STALL_EXIT_CODE, StallError

    where = f" (traceback in {log_file()})" if log_file() else ""
    try:
        return int(runner(cfg, **kwargs))
    except ConfigError as err:
        log.debug("%s failed", stage, exc_info=True)
        log.error("%s", str(err).strip().replace("\n", "; "))
        return 2
    except StallError as err:
        log.debug("%s stalled", stage, exc_info=True)
        log.error("%s", err)
        return STALL_EXIT_CODE
    except KeyboardInterrupt:
        log.error("raypipe %s: interrupted; committed work is kept, rerun to resume", stage)
        return 130
    except Exception as exc:
        log.debug("%s failed", stage, exc_info=True)
        code = getattr(exc, "exit_code", None)  # DataError, PromotionError: "cannot run as configured" (2)
        if isinstance(code, int):
            log.error("%s: %s", stage, str(exc).strip().replace("\n", "; "))
            return code
        log.error("raypipe %s failed: %s%s", stage, _one_line(exc), where)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `raypipe bench NAME --sizes 4`: options raypipe does not know go to the benchmark scripts; elsewhere an error.
    args, extra = parser.parse_known_args(argv)
    if extra and args.stage != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    path = setup_logging(args.verbose, stage=args.stage)
    if path:
        log.debug("raypipe %s: log file %s", args.stage, path)
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    missing = missing_paths_message(args.stage, cfg)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    # Relative paths are relative to where the command was typed: make them absolute before any Ray worker,
    # Tune trial or job driver (each with a working directory of its own) sees the config.
    cfg = resolve_paths(cfg)
    try:
        runner = _stage_runner(args.stage)
    except NotImplementedError as err:
        print(f"raypipe: {err}", file=sys.stderr)
        return 2
    from raypipe.logs import stderr_to_log_file

    with stderr_to_log_file():
        if args.stage == "bench":
            return run_stage(args.stage, runner, cfg, names=args.names, script_args=extra)
        if args.stage == "experiment":
            # --set reaches every row of the experiment (after the scale's settings, before the row's own keys)
            return run_stage(args.stage, runner, cfg, overrides=list(args.overrides),
                             **{("name" if k == "exp_name" else k[len("exp_"):]): v
                                for k, v in vars(args).items() if k.startswith("exp_")})
        if args.stage == "plan":
            return run_stage(args.stage, runner, cfg, **{k[len("plan_"):]: v for k, v in vars(args).items()
                                                         if k.startswith("plan_")})
        return run_stage(args.stage, runner, cfg)


if __name__ == "__main__":
    sys.exit(main())
