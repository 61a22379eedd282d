"""``cpet`` command line: one subcommand per pipeline stage (what ``dvc.yaml`` calls).

A user-facing problem (bad config, bad data) prints one line per problem to stderr and exits
non-zero: 2 for configuration errors, 1 for everything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cpet.env import apply_quiet_defaults
from cpet.errors import ConfigError, CpetError


def _parser() -> argparse.ArgumentParser:
    from cpet.stages import ORDER, STAGES

    p = argparse.ArgumentParser(prog="cpet", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root holding data/, models/, reports/")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ORDER:
        stage = STAGES[name]
        sp = sub.add_parser(name, help=f"run stage '{name}'")
        if stage.fan_out:
            sp.add_argument(f"--{stage.fan_out}", default=None,
                            help=f"run for one {stage.fan_out} only (default: all configured)")
    sv = sub.add_parser("serve", help="serve task bundles on one compressed base over HTTP")
    sv.add_argument("--method", help="compression method (default: the first of compress.methods)")
    sv.add_argument("--tasks", help="comma-separated tasks (default: every configured task)")
    sv.add_argument("--host", help="bind address (default: params.yaml serve.host, 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port (default: params.yaml serve.port)")
    from cpet.loadtest import add_arguments as load_test_arguments

    load_test_arguments(sub.add_parser("load-test", help="bounded load test of a running cpet serve (loopback)"))
    st = sub.add_parser("study", help="run params.yaml study's DVC experiments one at a time (dvc exp run --temp)")
    st.add_argument("--dry-run", action="store_true", help="print the dvc exp run commands only")
    st.add_argument("--only", nargs="*", help="experiment names or shell patterns, e.g. 'study-cells-*' "
                    "(default: all not yet done)")
    sub.add_parser("study-report", help="aggregate the study's experiments into reports/study/")
    fr = sub.add_parser("front", help="run params.yaml front.methods through the pipeline as one DVC experiment")
    fr.add_argument("--dry-run", action="store_true", help="print the dvc exp run command only")
    frr = sub.add_parser("front-report", help="accuracy vs ORT speedup per setting: reports/front.{json,md,png}")
    frr.add_argument("--workspace", action="store_true",
                     help="read the workspace's reports/results.json and bench.json, not the 'front' experiment")
    sub.add_parser("check-params", help="validate params.yaml and print it resolved")
    sd = sub.add_parser("stage-deps", help="each stage's code deps derived from its imports vs dvc.yaml")
    sd.add_argument("--write", action="store_true", help="rewrite the src/ deps in dvc.yaml to match")
    sub.add_parser("compress-report", help="print a markdown table of reports/compress/*.json")
    cm = sub.add_parser("compress-model", help="compress any HF causal LM folder/id, no pipeline")
    cm.add_argument("--model", required=True, help="HF model folder or hub id (safetensors)")
    cm.add_argument("--method", required=True,
                    help="a compress.methods name from params.yaml, or a JSON config")
    cm.add_argument("--out", required=True, help="output folder (written atomically)")
    cm.add_argument("--calib", type=Path, help="calibration texts: .jsonl with 'text' or .txt lines")
    cm.add_argument("--samples", type=int, default=64, help="calibration texts used (default 64)")
    cm.add_argument("--trust-remote-code", action="store_true", help="run model code from the hub")
    pr = sub.add_parser("promote", help="re-check a registered version's gates; 'champion' moves only if they pass")
    pr.add_argument("--model", required=True, help="registered model name, e.g. cpet-sentiment-int3")
    pr.add_argument("--version", help="version to check (default: the latest)")
    pd = sub.add_parser("predict", help="classify texts with a registered model or a bundle folder (JSON lines out)")
    src = pd.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="e.g. models:/cpet-sentiment-int3@champion")
    src.add_argument("--bundle", type=Path, help="a bundle folder, models/recover/<method>/<task>/<variant> "
                                                 "(its base: models/compressed/<method>; no registry)")
    pd.add_argument("--task", help="task for a base model, which scores every task (default: its first), or for a "
                                   "bundle outside models/recover/<method>/<task>/<variant>")
    pd.add_argument("texts", nargs="+", help="texts to classify ('-' reads one per line from stdin)")
    cd = sub.add_parser("card", help="print the model card (README.md) of a registered model or a local folder")
    cd.add_argument("target", help="models:/cpet-sentiment-int3@champion, models:/<name>/<version>, "
                                   "a bundle folder (models/recover/<m>/<task>/<variant>) or models/compressed/<m>")
    return p


def raise_on_sigterm() -> None:
    """Make SIGTERM (``kill``, a scheduler cancelling the job) unwind like Ctrl-C: ``finally``
    blocks run, so a stage's temporary output folder is removed and its MLflow run is marked
    KILLED instead of the process vanishing mid-write. Main thread only (Python's rule)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


# --------------------------------------------------------------------------- commands
# Each command: (args) -> exit code; `needs_params` ones get the validated params.yaml too.


def _compress_model(args) -> int:
    from cpet.standalone import compress_model, parse_method_arg

    method = parse_method_arg(args.method, Path(args.params))
    print(json.dumps(compress_model(args.model, method, Path(args.out), calib=args.calib, samples=args.samples,
                                    trust_remote_code=args.trust_remote_code), indent=2))
    return 0


def _stage_deps(args) -> int:
    from cpet.stages.codedeps import sync_dvc_yaml

    drift = sync_dvc_yaml(Path(args.root) / "dvc.yaml", write=args.write)
    for name, (listed, derived) in drift.items():
        print(f"{name}: missing {sorted(set(derived) - set(listed))}, "
              f"not imported {sorted(set(listed) - set(derived))}")
    return 0 if args.write or not drift else 1


def _compress_report(args) -> int:
    from cpet.stages.compress import table

    print(table(args.root), end="")
    return 0


def _serve(args, params) -> int:
    from cpet.serve import serve

    serve(params, Path(args.root), args.method or next(iter(params.compress.methods)),
          args.tasks.split(",") if args.tasks else None, args.host or params.serve.host,
          params.serve.port if args.port is None else args.port)
    return 0


def _study(args, params) -> int:
    from cpet import study

    commands = study.run(params, Path(args.root), args.only, args.dry_run)
    if args.dry_run:
        print("\n".join(commands))
    return 0


def _study_report(args, params) -> int:
    from cpet import study

    print(json.dumps(study.write_report(params, Path(args.root)), indent=2))
    return 0


def _front(args, params) -> int:
    from cpet import front

    print(front.run(params, Path(args.root), args.dry_run))
    return 0


def _front_report(args, params) -> int:
    from cpet import front

    result = front.write_report(params, Path(args.root), workspace=args.workspace)
    print(front.markdown(result), end="")
    return 0


def _load_test(args, params) -> int:
    from cpet.loadtest import command

    return command(params, Path(args.root), args)


def _check_params(args, params) -> int:
    print(json.dumps(params.model_dump(by_alias=True), indent=2))
    return 0


def _promote(args, params) -> int:
    from cpet.tracking.commands import promote_command

    return promote_command(params, Path(args.root), args.model, args.version)


def _predict(args, params) -> int:
    texts = [line.rstrip("\n") for line in sys.stdin if line.strip()] if args.texts == ["-"] else args.texts
    if args.bundle is not None:
        from cpet.standalone import bundle_predict

        for row in bundle_predict(params, Path(args.root), args.bundle, texts, task=args.task):
            print(json.dumps(row))
        return 0
    from cpet.tracking.commands import predict_command

    return predict_command(params, Path(args.root), args.model, texts, args.task)


def _card(args, params) -> int:
    from cpet.tracking.commands import card_command

    return card_command(params, Path(args.root), args.target)


def _stage(args, params) -> int:
    from cpet.stages import STAGES

    stage = STAGES[args.command]
    item = getattr(args, stage.fan_out) if stage.fan_out else None
    selector = {stage.fan_out: item} if item is not None else {}
    print(json.dumps(stage(params, Path(args.root), **selector), indent=2, default=str))
    return 0


#: command -> (handler, needs params.yaml); every stage name maps to _stage
COMMANDS = {
    "compress-model": (_compress_model, False),
    "stage-deps": (_stage_deps, False),
    "compress-report": (_compress_report, False),
    "serve": (_serve, True),
    "study": (_study, True),
    "study-report": (_study_report, True),
    "front": (_front, True),
    "front-report": (_front_report, True),
    "load-test": (_load_test, True),
    "check-params": (_check_params, True),
    "promote": (_promote, True),
    "predict": (_predict, True),
    "card": (_card, True),
}


def main(argv: list[str] | None = None) -> int:
    apply_quiet_defaults()
    raise_on_sigterm()
    args = _parser().parse_args(argv)
    handler, needs_params = COMMANDS.get(args.command, (_stage, True))
    try:
        if not needs_params:
            return handler(args)
        from cpet.config import load_params

        return handler(args, load_params(Path(args.params)))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CpetError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
