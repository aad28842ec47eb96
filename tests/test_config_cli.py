"""Run configs, the YAML files in configs/, the CLI, the built-in tasks and the warm start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from agilerl_llm.cli import main as cli_main
from agilerl_llm.envs.tasks import TASKS, get_task, letters_reward
from agilerl_llm.envs.tasks.letters import make_letters_dataset
from agilerl_llm.training.config import ConfigError, RunConfig
from agilerl_llm.training.warmstart import IGNORE_INDEX, collate_demonstrations, pretrain_on_demonstrations

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert CONFIGS, "configs/ has no YAML files"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    assert isinstance(RunConfig.from_yaml(path), RunConfig)


def test_quickstart_yaml_is_the_quickstart_default():
    """`python -m agilerl_llm.quickstart` and `agilerl-llm train configs/quickstart.yaml` are the same run."""
    path = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    assert RunConfig.from_yaml(path) == RunConfig()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"training": {"max_stepz": 3}}, "training.max_stepz"),
        ({"training": {"max_steps": 0}}, "training.max_steps"),
        ({"task": {"name": "chess"}}, "task.name"),
        ({"model": {"size": "huge"}}, "model.size"),
        ({"warm_start": {"lr": -1}}, "warm_start.lr"),
        ({"algorithm": {"name": "DQN"}}, "algorithm.name"),
    ],
)
def test_bad_config_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        RunConfig.from_dict(data)


def test_overrides_are_parsed_as_yaml_values():
    config = RunConfig.from_dict({}, ["training.max_steps=7", "algorithm.params.lr=2e-4", "logging.progress=false"])
    assert config.training.max_steps == 7 and config.algorithm.params["lr"] == 2e-4
    assert config.logging.progress is False
    with pytest.raises(ConfigError, match="dotted.key=value"):
        RunConfig.from_dict({}, ["training.max_steps"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "algorithm.params.group_sise=4",
            r"algorithm\.params\.group_sise is not an argument of GRPO \(did you mean 'group_size'\?\)",
        ),
        (
            "algorithm.params.group_size=1",
            r"algorithm\.params\.group_size: Input should be greater than or equal to 2 \(got 1\)",
        ),
        ("algorithm.params.lr=-0.001", r"algorithm\.params: lr must be > 0, got -0\.001"),
        ("algorithm.params.update_epochs=0", r"algorithm\.params\.update_epochs"),
        ("algorithm.params.temperature=0", r"algorithm\.params\.temperature"),
        ("algorithm.params.pad_token_id=3", r"algorithm\.params\.pad_token_id is not an argument"),
    ],
)
def test_algorithm_params_are_checked_when_the_config_is_read(override, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({}, [override])


def test_cli_check_rejects_bad_params_and_paths_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"training": {"max_steps": 3}}))
    (tmp_path / "a_file").write_text("x")
    cases = {
        "algorithm.params.group_sise=4": "algorithm.params.group_sise is not an argument",
        f"model.path={tmp_path / 'nowhere'}": "model.path: Value error, '",
        f"output_dir={tmp_path / 'a_file'}": "exists and is not a folder; choose another output_dir",
        f"checkpoint.path={tmp_path / 'a_file'}": "checkpoint",
    }
    for override, expected in cases.items():
        assert cli_main(["check", str(path), override]) == 2, override
        error = capsys.readouterr().err
        assert expected in error and "Traceback" not in error, (override, error)
        assert len(error.strip().splitlines()) == 1, error
    assert "not downloaded from a hub" in (
        cli_main(["check", str(path), f"model.path={tmp_path}"]) and capsys.readouterr().err
    )


def test_cli_check_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"training": {"max_steps": 3}}))
    assert cli_main(["check", str(path), "task.name=sort"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["max_steps"] == 3 and printed["task"]["name"] == "sort"
    assert printed["warm_start"] == RunConfig().warm_start.model_dump()


def test_cli_rejects_a_bad_config_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  max_steps: -1\n")
    assert cli_main(["check", str(path)]) == 2
    assert "training.max_steps" in capsys.readouterr().err
    assert cli_main(["check", str(tmp_path / "missing.yaml")]) == 2


def test_cli_lists_tasks(capsys):
    assert cli_main(["tasks"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in TASKS)


# ---------------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_splits_are_disjoint_deterministic_and_answered(name):
    task = get_task(name)
    train, test = task.make_dataset(500, 50, 3)
    assert (train, test) == task.make_dataset(500, 50, 3)
    assert not {s["question"] for s in train} & {s["question"] for s in test}
    for sample in train[:20] + test[:20]:
        assert task.reward_fn(sample["answer"], sample["answer"], sample["question"]) == 1.0


def test_letters_reward_examples():
    assert letters_reward("dbac", "dbac") == 1.0
    assert letters_reward(" dbac\n", "dbac") == 1.0
    assert letters_reward("dbca", "dbac") == pytest.approx(0.25)
    assert letters_reward("dbacx", "dbac") == pytest.approx(0.4)
    assert letters_reward("xyz", "dbac") == 0.0
    assert letters_reward("", "dbac") == 0.0


def test_bad_task_arguments_raise():
    with pytest.raises(ValueError, match="task="):
        get_task("chess")
    with pytest.raises(ValueError, match="more than half"):
        make_letters_dataset("reverse", 10_000, 10, max_length=3, alphabet_size=4)


# ------------------------------------------------------------------------------------------ warm start
def test_demonstration_labels_mask_prompt_and_padding():
    batch = collate_demonstrations([([5, 6, 7, 8], 2), ([5, 9], 1)], pad_token_id=0)
    assert batch.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_warm_start_learns_the_demonstrations(tiny_model, tokenizer):
    examples = [(f"<|user|>{q}<|eos|><|assistant|>", a + tokenizer.eos_token) for q, a in [("ab", "ba"), ("cd", "dc")]]
    from agilerl_llm.training.warmstart import demonstration_loss, tokenize_demonstrations

    batch = collate_demonstrations(tokenize_demonstrations(tokenizer, examples), tokenizer.pad_token_id)
    with torch.no_grad():
        before = float(demonstration_loss(tiny_model, batch))
    pretrain_on_demonstrations(tiny_model, tokenizer, examples, steps=30, batch_size=4, lr=1e-2)
    with torch.no_grad():
        after = float(demonstration_loss(tiny_model, batch))
    assert after < before / 4, (before, after)


def test_overrides_keep_the_other_algorithm_params():
    config = RunConfig.from_dict({}, ["algorithm.params.lr=5e-4"])
    assert config.algorithm.params == RunConfig().algorithm.params | {"lr": 5e-4}


def test_checkpoint_section_is_validated(tmp_path):
    config = RunConfig.from_dict({"checkpoint": {"path": str(tmp_path), "interval": 5, "keep": 2}})
    assert config.checkpoint.interval == 5 and config.checkpoint.resume == "latest"
    with pytest.raises(ConfigError, match=r"checkpoint\.keep"):
        RunConfig.from_dict({"checkpoint": {"path": str(tmp_path), "keep": 0}})


def test_overrides_switch_on_optional_sections():
    config = RunConfig.from_dict(
        {}, ["checkpoint.path=runs/x/checkpoints", "checkpoint.interval=5", "evolution.population_size=3"]
    )
    assert str(config.checkpoint.path) == "runs/x/checkpoints" and config.checkpoint.interval == 5
    assert config.evolution.population_size == 3 and config.evolution.evo_steps == 25


def test_population_config_is_valid_and_checks_ranges():
    config = RunConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "population.yaml")
    assert config.evolution.population_size == 4 and set(config.evolution.hyperparameters) == {"lr", "temperature"}
    with pytest.raises(ConfigError, match=r"evolution\.hyperparameters\.lr.*min"):
        RunConfig.from_dict({"evolution": {"hyperparameters": {"lr": {"min": 0.1, "max": 0.01}}}})
    with pytest.raises(ConfigError, match=r"evolution.*tournament_size"):
        RunConfig.from_dict({"evolution": {"population_size": 2, "tournament_size": 3}})
