"""``agilerl-llm``: the command line.

agilerl-llm train configs/quickstart.yaml [dotted.key=value ...]   # run a reasoning job
agilerl-llm check configs/quickstart.yaml                          # validate a config, print it resolved
agilerl-llm tasks                                                  # list the built-in tasks
agilerl-llm checkpoints list RUN_DIR                               # the step folders of a run
agilerl-llm checkpoints verify RUN_DIR [--step N]                  # check that a run's checkpoints read back
agilerl-llm checkpoints export RUN_DIR --out DIR [--step N] [--agent I] [--base-model DIR] [--tokenizer DIR]
                                                                   # a merged HuggingFace model (see docs/checkpoint_cli.md)
RUN_DIR may be a URL (s3://bucket/run, gs://..., memory://...); ``--storage-option KEY=VALUE`` (repeatable) passes
fsspec storage_options, e.g. --storage-option 'client_kwargs={"endpoint_url": "http://127.0.0.1:9000"}'.

Exit codes: 0 success, 1 problems found (``checkpoints verify``) or a failed export, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from agilerl_llm.envs.tasks import TASKS
from agilerl_llm.training.config import ConfigError, RunConfig

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agilerl-llm", description="RL fine-tuning of LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run a reasoning job from a YAML config")
    check = commands.add_parser("check", help="validate a YAML config and print it with defaults filled in")
    for command in (train, check):
        command.add_argument("config", help="path to a YAML run config (see configs/)")
        command.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. training.max_steps=20")
    commands.add_parser("tasks", help="list the built-in tasks")
    _add_checkpoint_commands(commands)
    return parser


def _add_checkpoint_commands(commands: argparse._SubParsersAction) -> None:
    checkpoints = commands.add_parser("checkpoints", help="list, verify or export a run's checkpoints")
    actions = checkpoints.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the step folders of a run: step, size, complete, latest")
    listing.add_argument(
        "path", help="the run's checkpoint folder or URL (CheckpointConfig.path); a URL is listed, not downloaded"
    )
    verify = actions.add_parser("verify", help="check that every file of the run's checkpoints reads back")
    verify.add_argument(
        "path",
        help="the run's checkpoint folder, or one global_step_<N> folder; for a URL the checked step folders are "
        "downloaded to a temporary folder (every complete step of the run when no --step is given)",
    )
    verify.add_argument("--step", type=int, help="check only this step (default: every complete step)")
    export = actions.add_parser("export", help="write an agent's policy as a merged HuggingFace model")
    export.add_argument(
        "path",
        help="the run's checkpoint folder, or one global_step_<N> folder; for a URL only the chosen "
        "global_step_<N>/agent_<I> folder is downloaded (to a temporary folder)",
    )
    export.add_argument("--out", required=True, help="the folder to write the HuggingFace model to")
    export.add_argument("--step", type=int, help="the step to export (default: the latest complete one)")
    export.add_argument("--agent", type=int, default=0, help="which population member (default: 0)")
    export.add_argument("--base-model", help="the base model the run trained on (default: the agent's model_name)")
    export.add_argument("--tokenizer", help="where to load the tokenizer from (default: the base model's folder)")
    for command in (listing, verify, export):
        command.add_argument(
            "--storage-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="an fsspec storage option for a URL path (repeatable; VALUE is parsed as JSON when it can be), "
            'e.g. anon=true or client_kwargs=\'{"endpoint_url": "http://127.0.0.1:9000"}\'; credentials also come '
            "from the usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...)",
        )


def parse_storage_options(items: list[str]) -> dict:
    """``KEY=VALUE`` strings as a storage_options dict; a VALUE that parses as JSON is used parsed."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _UsageError(f"--storage-option {item!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "tasks":
        for name, task in sorted(TASKS.items()):
            print(f"{name:<10} {task.make_dataset.__doc__.splitlines()[0]}")
        return EXIT_OK
    if args.command == "checkpoints":
        return _checkpoints(args)
    try:
        config = RunConfig.from_yaml(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as error:
        print(f"agilerl-llm: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check":
        print(yaml.safe_dump(config.model_dump(), sort_keys=False), end="")
        return EXIT_OK
    from agilerl_llm.distributed import shutdown_process_group
    from agilerl_llm.quickstart import summary_table
    from agilerl_llm.training.job import run_job

    result = run_job(config)
    if result.is_main:  # under a multi-process launch, one report
        print(summary_table(result))
    shutdown_process_group()
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- checkpoints
class _UsageError(Exception):
    """A problem with what the user asked for (missing folder, unknown step, no base model): exit code 2."""


def _checkpoints(args: argparse.Namespace) -> int:
    handlers = {"list": _list, "verify": _verify, "export": _export}
    try:
        return handlers[args.action](args)
    except (_UsageError, OSError, ValueError) as error:  # OSError: a missing folder, a refused --out, ...
        from agilerl_llm.checkpoint.files import CheckpointError

        if isinstance(error, CheckpointError):  # a damaged or mismatched checkpoint, not a usage error
            print(f"agilerl-llm: {error}", file=sys.stderr)
            return EXIT_PROBLEMS
        print(f"agilerl-llm: {error}", file=sys.stderr)
        return EXIT_USAGE


def _list(args: argparse.Namespace) -> int:
    from agilerl_llm.checkpoint.catalog import list_checkpoints
    from agilerl_llm.checkpoint.storage import basename

    infos = list_checkpoints(args.path, parse_storage_options(args.storage_option))
    if not infos:
        print(f"no checkpoints under {args.path}")
        return EXIT_OK
    print(f"{'step':>8}  {'size (MB)':>10}  {'state':<10}  {'latest':<6}  folder")
    for info in infos:
        state = "damaged" if info.problem else "complete" if info.complete else "incomplete"
        latest = "*" if info.is_latest else ""
        print(f"{info.step:>8}  {info.size / 1e6:>10.2f}  {state:<10}  {latest:<6}  {basename(info.folder)}")
    for info in infos:
        if info.problem:
            print(f"step {info.step} is damaged (a resume skips it): {info.problem}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from agilerl_llm.checkpoint.catalog import run_store, verify_checkpoint

    options = parse_storage_options(args.storage_option)
    if not run_store(args.path, options).isdir():
        raise _UsageError(f"no such folder: {args.path}")
    problems = verify_checkpoint(args.path, step=args.step, storage_options=options)
    if not problems:
        print("OK")
        return EXIT_OK
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"{len(problems)} problem(s) found")
    return EXIT_PROBLEMS


def _export(args: argparse.Namespace) -> int:
    """Find the step folder (the one given, ``--step``, or the latest), materialise its ``agent_<I>`` folder
    locally (a download for a URL) and export that."""
    from agilerl_llm.checkpoint.catalog import list_checkpoints, run_store
    from agilerl_llm.checkpoint.run import STEP_PREFIX, TRAINER_STATE_FILE
    from agilerl_llm.checkpoint.storage import basename

    options = parse_storage_options(args.storage_option)
    store = run_store(args.path, options)
    if not store.isdir():
        raise _UsageError(f"no such folder: {args.path}")
    if args.step is None and basename(store.location()).startswith(STEP_PREFIX) and store.isfile(TRAINER_STATE_FILE):
        step_store = store  # one global_step_<N> folder
    else:
        complete = [info for info in list_checkpoints(args.path, options) if info.complete and not info.problem]
        if not complete:
            raise _UsageError(f"no complete {STEP_PREFIX}<N> folder under {store.location()}")
        if args.step is None:
            step = next((info.step for info in complete if info.is_latest), complete[-1].step)
        else:
            step = args.step
            steps = [info.step for info in complete]
            if step not in steps:
                raise _UsageError(
                    f"--step {step}: {store.location(f'{STEP_PREFIX}{step}')} is not a complete checkpoint "
                    f"(complete: {steps})"
                )
        step_store = store.sub(f"{STEP_PREFIX}{step}")
    agent = f"agent_{args.agent}"
    if not step_store.isdir(agent):
        agents = [name for name in step_store.listdir() if name.startswith("agent_")]
        raise _UsageError(f"--agent {args.agent}: {step_store.location(agent)} does not exist (agents: {agents})")
    with step_store.materialize_some([agent]) as local:
        return _export_agent(args, local / agent, shown=step_store.location(agent))


def _export_agent(args: argparse.Namespace, agent_dir: Path, shown: Path | str) -> int:
    """Export the local ``agent_<I>`` folder; ``shown`` names it in messages (its URL for a downloaded one)."""
    from agilerl_llm.checkpoint.export import export_checkpoint
    from agilerl_llm.checkpoint.files import read_attributes

    base_model = args.base_model or _saved_base_model(read_attributes(agent_dir), shown)
    out = export_checkpoint(agent_dir, args.out, base_model=base_model, tokenizer=args.tokenizer)
    print(f"exported {shown} (base model {base_model}) to {out}")
    return EXIT_OK


def _saved_base_model(saved: dict, agent_dir: Path | str) -> str:
    """The agent's ``model_name`` when it was built from a path; otherwise ask for --base-model."""
    model_name = saved.get("attributes", {}).get("model_name")
    if not model_name:
        raise _UsageError(
            f"{agent_dir} does not record its base model (the agent was built from a model object, not a "
            "model_name path); pass --base-model DIR with the base model the run trained on."
        )
    if not Path(model_name).is_dir() and (model_name.startswith((".", "/", "~")) or model_name.count("/") > 1):
        raise _UsageError(
            f"the agent's base model {model_name!r} (its model_name) is not a folder here; pass --base-model DIR "
            "with the base model the run trained on."
        )
    return model_name


if __name__ == "__main__":
    sys.exit(main())
