"""``agilerl-llm``: the command line.

agilerl-llm train configs/quickstart.yaml [dotted.key=value ...]   # run a reasoning job
agilerl-llm check configs/quickstart.yaml                          # validate a config, print it resolved
agilerl-llm tasks                                                  # list the built-in tasks
"""

from __future__ import annotations

import argparse
import sys

import yaml

from agilerl_llm.envs.tasks import TASKS
from agilerl_llm.training.config import ConfigError, RunConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agilerl-llm", description="RL fine-tuning of LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run a reasoning job from a YAML config")
    check = commands.add_parser("check", help="validate a YAML config and print it with defaults filled in")
    for command in (train, check):
        command.add_argument("config", help="path to a YAML run config (see configs/)")
        command.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. training.max_steps=20")
    commands.add_parser("tasks", help="list the built-in tasks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "tasks":
        for name, task in sorted(TASKS.items()):
            print(f"{name:<10} {task.make_dataset.__doc__.splitlines()[0]}")
        return 0
    try:
        config = RunConfig.from_yaml(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as error:
        print(f"agilerl-llm: {error}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(yaml.safe_dump(config.model_dump(), sort_keys=False), end="")
        return 0
    from agilerl_llm.quickstart import summary_table
    from agilerl_llm.training.job import run_reasoning_job

    print(summary_table(run_reasoning_job(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
