"""Agent checkpoints on the plain path: every grid cell round trip, load semantics, errors, safety, atomicity."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from agilerl_llm import CISPO, GRPO, GSPO, LLMAlgorithm, save_llm_checkpoint
from agilerl_llm.checkpoint import CheckpointError
from agilerl_llm.checkpoint import files as checkpoint_files
from agilerl_llm.optim import CosineLRScheduleConfig
from agilerl_llm.testing import save_tiny_model


class CriticGRPO(GRPO):
    """GRPO carrying a critic adapter, to exercise the critic rules (no algorithm here trains one yet)."""

    uses_critic = True


def make_agent(model_dir, tokenizer, cls=GRPO, seed=1, **kwargs):
    kwargs = {
        "lr": 1e-2,
        "batch_size": 4,
        "beta": 0.05,
        "group_size": 4,
        "gradient_checkpointing": False,
        "cosine_lr_schedule_config": CosineLRScheduleConfig(num_epochs=10, warmup_proportion=0.2),
    } | kwargs
    if cls is LLMAlgorithm:
        for name in ("beta", "group_size"):
            kwargs.pop(name)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return cls(tokenizer.pad_token_id, tokenizer.pad_token, actor_network=model, seed=seed, **kwargs)


def experiences(seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (4, 10), generator=generator)
    action_mask = torch.zeros(4, 9, dtype=torch.long)
    action_mask[:, 4:] = 1
    return ids, action_mask, torch.rand(1, 4, generator=generator)


def learn(agent, seed: int):
    torch.manual_seed(0)
    return agent.learn(experiences(seed))


def weights(agent) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in agent.actor.named_parameters()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], only: str | None = None) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if only is None or only in name:
            assert torch.equal(a[name], b[name]), name


def assert_same_state(a, b, where="state") -> None:
    """Recursive bitwise equality of optimizer / scheduler state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture()
def trained(tiny_model_dir, tokenizer):
    """A GRPO agent one learning step in: the actor has left the reference; optimizer and schedule have state."""
    agent = make_agent(tiny_model_dir, tokenizer)
    learn(agent, 0)
    agent.fitness.append(0.25)
    return agent


# ---------------------------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("lora_only", [True, False], ids=["lora_only", "full"])
@pytest.mark.parametrize("save_optimizer", [True, False], ids=["with_opt", "no_opt"])
@pytest.mark.parametrize("load_optimizer", [True, False], ids=["load_opt", "keep_opt"])
def test_grid_round_trip(tiny_model_dir, tokenizer, trained, tmp_path, lora_only, save_optimizer, load_optimizer):
    if not lora_only:  # the full state carries the base weights: make them differ from the fresh model's
        with torch.no_grad():
            next(p for n, p in trained.actor.named_parameters() if "lora_" not in n and "norm" in n).add_(0.5)
    trained.save_checkpoint(tmp_path / "ckpt", lora_only=lora_only, save_optimizer=save_optimizer)

    on_disk = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert on_disk == ({"attributes.pt", "actor", "reference"} if lora_only else {"attributes.pt"})
    if lora_only:
        assert {p.name for p in (tmp_path / "ckpt" / "actor").iterdir()} == {
            "adapter_model.safetensors",
            "adapter_config.json",
        }
    saved = torch.load(tmp_path / "ckpt" / "attributes.pt", weights_only=True)
    assert ("optimizer" in saved) == save_optimizer
    assert ("actor_state_dict" in saved) == (not lora_only)

    restored = make_agent(tiny_model_dir, tokenizer, seed=7, lr=3e-3)
    live_optimizer = restored.optimizer.state_dict()
    if load_optimizer and not save_optimizer:
        with pytest.warns(UserWarning, match="no usable optimizer state"):
            restored.load_checkpoint(tmp_path / "ckpt", load_optimizer=True, overwrite_reference_adapter=True)
    else:
        restored.load_checkpoint(tmp_path / "ckpt", load_optimizer=load_optimizer, overwrite_reference_adapter=True)

    assert_same_weights(weights(trained), weights(restored))
    assert restored.fitness == [0.25] and restored.lr == trained.lr
    if load_optimizer and save_optimizer:
        assert_same_state(trained.optimizer.state_dict(), restored.optimizer.state_dict())
        assert_same_state(trained.lr_scheduler.state_dict(), restored.lr_scheduler.state_dict())
        # Resumed = uninterrupted: the next step is bit-identical.
        assert learn(trained, 2) == learn(restored, 2)
        assert_same_weights(weights(trained), weights(restored))
    else:
        assert_same_state(live_optimizer["state"], restored.optimizer.state_dict()["state"])
        # The restored lr is the new peak; the fresh schedule keeps its own position (here its first step).
        factor = restored.lr_scheduler.lr_lambdas[0](restored.lr_scheduler.last_epoch)
        for group in restored.optimizer.param_groups:
            assert group["initial_lr"] == trained.lr and group["lr"] == pytest.approx(trained.lr * factor)


@pytest.mark.parametrize("cls", [GRPO, GSPO, CISPO, LLMAlgorithm])
def test_every_algorithm_round_trips_with_defaults(tiny_model_dir, tokenizer, tmp_path, cls):
    agent = make_agent(tiny_model_dir, tokenizer, cls=cls)
    with torch.no_grad():
        for p in agent.adapters.parameters("actor"):
            p.add_(torch.randn_like(p) * 0.01)
    agent.save_checkpoint(tmp_path / "ckpt")
    assert torch.load(tmp_path / "ckpt" / "attributes.pt", weights_only=True)["algorithm"] == cls.__name__
    restored = make_agent(tiny_model_dir, tokenizer, cls=cls, seed=9)
    restored.load_checkpoint(tmp_path / "ckpt")
    assert_same_weights(weights(agent), weights(restored), only=".actor.")


# ---------------------------------------------------------------------------------------------- adapter rules
def test_default_load_makes_the_loaded_actor_the_reference(tiny_model_dir, tokenizer, trained, tmp_path):
    trained.save_checkpoint(tmp_path / "ckpt")
    restored = make_agent(tiny_model_dir, tokenizer, seed=7)
    restored.load_checkpoint(tmp_path / "ckpt")
    actor = restored.adapters.state_dict("actor")
    for key, value in restored.adapters.state_dict("reference").items():
        assert torch.equal(value, actor[key])
    # ... while overwrite_reference_adapter=True restores the saved (older) reference exactly.
    restored.load_checkpoint(tmp_path / "ckpt", overwrite_reference_adapter=True)
    saved_reference = trained.adapters.state_dict("reference")
    for key, value in restored.adapters.state_dict("reference").items():
        assert torch.equal(value, saved_reference[key])
    assert not all(torch.equal(saved_reference[k], actor[k]) for k in actor)


def test_critic_is_loaded_copied_from_the_actor_or_kept(tiny_model_dir, tokenizer, tmp_path):
    agent = make_agent(tiny_model_dir, tokenizer, cls=CriticGRPO)
    assert agent.adapter_names() == ("actor", "reference", "critic")
    with torch.no_grad():
        for name in ("actor", "critic"):
            for p in agent.adapters.parameters(name):
                p.add_(torch.randn_like(p) * 0.01)
    agent.save_checkpoint(tmp_path / "with_critic")
    assert (tmp_path / "with_critic" / "critic" / "adapter_model.safetensors").is_file()

    restored = make_agent(tiny_model_dir, tokenizer, cls=CriticGRPO, seed=5)
    restored.load_checkpoint(tmp_path / "with_critic")
    assert_same_weights(weights(agent), weights(restored), only=".critic.")

    kept = make_agent(tiny_model_dir, tokenizer, cls=CriticGRPO, seed=5)
    live_critic = weights(kept)
    kept.load_checkpoint(tmp_path / "with_critic", overwrite_critic_adapter=False)
    assert_same_weights(live_critic, weights(kept), only=".critic.")

    # A checkpoint without a critic (e.g. from SFT or GRPO): the critic starts from the loaded actor.
    plain = make_agent(tiny_model_dir, tokenizer)
    plain.adapters.load_state_dict("actor", agent.adapters.state_dict("actor"))
    plain.save_checkpoint(tmp_path / "no_critic")
    from_actor = make_agent(tiny_model_dir, tokenizer, cls=CriticGRPO, seed=5)
    from_actor.load_checkpoint(tmp_path / "no_critic", load_optimizer=False)  # its optimizer lacks the critic
    actor = from_actor.adapters.state_dict("actor")
    assert all(torch.equal(v, actor[k]) for k, v in from_actor.adapters.state_dict("critic").items())


def test_checkpoint_without_reference_loads_into_an_agent_with_one(tiny_model_dir, tokenizer, trained, tmp_path):
    sft_like = make_agent(tiny_model_dir, tokenizer, use_separate_reference_adapter=False)
    sft_like.adapters.load_state_dict("actor", trained.adapters.state_dict("actor"))
    sft_like.save_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "reference").exists()
    restored = make_agent(tiny_model_dir, tokenizer, seed=3)
    restored.load_checkpoint(tmp_path / "ckpt", load_optimizer=False)
    expected = trained.adapters.state_dict("actor")
    for name in ("actor", "reference"):
        assert all(torch.equal(v, expected[k]) for k, v in restored.adapters.state_dict(name).items())


def test_hyperparameters_are_restored_only_onto_the_same_algorithm(tiny_model_dir, tokenizer, trained, tmp_path):
    trained.save_checkpoint(tmp_path / "ckpt")  # GRPO, lr=1e-2, beta=0.05, fitness [0.25]
    resumed = make_agent(tiny_model_dir, tokenizer, lr=1e-4, beta=0.2)
    resumed.load_checkpoint(tmp_path / "ckpt", load_optimizer=False)
    assert (resumed.lr, resumed.beta, resumed.fitness) == (1e-2, 0.05, [0.25])
    assert all(group["initial_lr"] == 1e-2 for group in resumed.optimizer.param_groups)  # the schedule's new peak
    next_stage = make_agent(tiny_model_dir, tokenizer, cls=GSPO, lr=1e-4, beta=0.2)
    next_stage.load_checkpoint(tmp_path / "ckpt", load_optimizer=False)
    assert (next_stage.lr, next_stage.beta, next_stage.loss_type, next_stage.fitness) == (1e-4, 0.2, "gspo", [])
    assert_same_weights(weights(trained), weights(next_stage), only=".actor.")


# ---------------------------------------------------------------------------------------------- interop
def test_adapter_folders_load_with_peft_from_pretrained(tiny_model_dir, tokenizer, trained, tmp_path):
    save_llm_checkpoint(trained, tmp_path / "release")
    saved = torch.load(tmp_path / "release" / "attributes.pt", weights_only=True)
    assert "optimizer" not in saved and "actor_state_dict" not in saved
    batch = tokenizer(["The cat sat.", "hi"], padding=True, return_tensors="pt")
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": position_ids}
    for adapter in ("actor", "reference"):
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "release" / adapter
        )
        trained.set_training_mode(False)
        with torch.no_grad(), trained.select_adapter(adapter):
            expected = trained.actor(**inputs).logits
            assert torch.equal(peft_model(**inputs).logits, expected)


# ---------------------------------------------------------------------------------------------- errors
def test_lora_config_mismatch_names_the_field_and_the_fix(tiny_model_dir, tokenizer, tmp_path):
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    make_agent(tiny_model_dir, tokenizer, lora_config=config).save_checkpoint(tmp_path / "ckpt")
    live = make_agent(tiny_model_dir, tokenizer)
    before = weights(live)
    with pytest.raises(CheckpointError, match=r"r: checkpoint=8, live=16.*lora_config=LoraConfig"):
        live.load_checkpoint(tmp_path / "ckpt")
    assert_same_weights(before, weights(live))

    # The adapter folder's own config is checked too (e.g. edited by hand).
    same = make_agent(tiny_model_dir, tokenizer, lora_config=config)
    config_file = tmp_path / "ckpt" / "actor" / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace('"lora_alpha": 16', '"lora_alpha": 4'))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json.*lora_alpha: checkpoint=4, live=16"):
        same.load_checkpoint(tmp_path / "ckpt")


def test_other_base_model_fails_before_touching_weights(tiny_model_dir, tokenizer, tmp_path_factory, tmp_path):
    other_dir = save_tiny_model(tmp_path_factory.mktemp("other"), "tiny", architecture="qwen2")
    make_agent(other_dir, tokenizer).save_checkpoint(tmp_path / "ckpt")
    live = make_agent(tiny_model_dir, tokenizer)
    before, optimizer = weights(live), live.optimizer.state_dict()
    with pytest.raises(CheckpointError, match="different base model.*has shape"):
        live.load_checkpoint(tmp_path / "ckpt")
    assert_same_weights(before, weights(live))
    assert_same_state(optimizer, live.optimizer.state_dict())


def test_missing_truncated_and_corrupt_files_are_named(tiny_model_dir, tokenizer, trained, tmp_path):
    live = make_agent(tiny_model_dir, tokenizer)
    with pytest.raises(FileNotFoundError, match="No agent checkpoint folder"):
        live.load_checkpoint(tmp_path / "nowhere")

    def fresh(name: str) -> Path:
        trained.save_checkpoint(tmp_path / name)
        return tmp_path / name

    path = fresh("no_attributes")
    (path / "attributes.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_attributes/attributes\.pt is missing"):
        live.load_checkpoint(path)

    path = fresh("no_weights")
    (path / "actor" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"actor/adapter_model\.safetensors is missing"):
        live.load_checkpoint(path)

    path = fresh("truncated_attributes")
    data = (path / "attributes.pt").read_bytes()
    (path / "attributes.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated_attributes/attributes\.pt is truncated or corrupt"):
        live.load_checkpoint(path)

    path = fresh("truncated_weights")
    file = path / "reference" / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"reference/adapter_model\.safetensors is truncated or corrupt"):
        live.load_checkpoint(path, overwrite_reference_adapter=True)

    path = fresh("corrupt_config")
    (path / "actor" / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"actor/adapter_config\.json is corrupt"):
        live.load_checkpoint(path)

    path = fresh("not_ours")
    torch.save({"weights": torch.zeros(2)}, path / "attributes.pt")
    with pytest.raises(CheckpointError, match="not an agilerl_llm agent checkpoint"):
        live.load_checkpoint(path)


class _RunsCode:
    """Unpickling this object creates the file ``marker`` (stands in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_objects_in_attributes_are_refused_and_never_run(tiny_model_dir, tokenizer, trained, tmp_path):
    # The payload is real: an ordinary unpickle would run it.
    armed = tmp_path / "armed.pt"
    torch.save({"format_version": 1, "x": _RunsCode(tmp_path / "ran_in_control")}, armed)
    torch.load(armed, weights_only=False)
    assert (tmp_path / "ran_in_control").exists()

    trained.save_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    saved = torch.load(tmp_path / "ckpt" / "attributes.pt", weights_only=True)
    saved["attributes"]["payload"] = _RunsCode(marker)
    torch.save(saved, tmp_path / "ckpt" / "attributes.pt")
    live = make_agent(tiny_model_dir, tokenizer)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        live.load_checkpoint(tmp_path / "ckpt")
    assert not marker.exists()


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(trained, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an agent checkpoint"):
        trained.save_checkpoint(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_optimizer_state_for_other_adapters_is_refused_before_loading(tiny_model_dir, tokenizer, tmp_path):
    critic_agent = make_agent(tiny_model_dir, tokenizer, cls=CriticGRPO)
    learn(critic_agent, 0)
    critic_agent.save_checkpoint(tmp_path / "ckpt")
    live = make_agent(tiny_model_dir, tokenizer)
    before = weights(live)
    with pytest.raises(CheckpointError, match="load_optimizer=False"):
        live.load_checkpoint(tmp_path / "ckpt")
    assert_same_weights(before, weights(live))
    live.load_checkpoint(tmp_path / "ckpt", load_optimizer=False)  # the weights alone load fine


# ---------------------------------------------------------------------------------------------- atomic writes
def test_crash_mid_save_keeps_the_previous_checkpoint(tiny_model_dir, tokenizer, trained, tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    trained.save_checkpoint(path)
    files_before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    learn(trained, 2)

    calls = []

    def crash_on_second_adapter(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half a file")
            raise OSError("disk full")
        checkpoint_files.save_file.__wrapped__(tensors, filename, metadata=metadata)

    crash_on_second_adapter.__wrapped__ = checkpoint_files.save_file
    monkeypatch.setattr(checkpoint_files, "save_file", crash_on_second_adapter)
    with pytest.raises(OSError, match="disk full"):
        trained.save_checkpoint(path)
    assert len(calls) == 2
    monkeypatch.undo()

    files_after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert files_after == files_before  # the old checkpoint, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written sibling left behind
    make_agent(tiny_model_dir, tokenizer).load_checkpoint(path)

    trained.save_checkpoint(path)  # a successful save replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (path / "attributes.pt").read_bytes() != files_before[Path("attributes.pt")]


def test_attributes_hold_only_plain_data(trained, tmp_path):
    trained.save_checkpoint(tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / "attributes.pt", "rb") as handle:
        assert handle.read(2) == b"PK"  # torch's zip format
    saved = torch.load(tmp_path / "ckpt" / "attributes.pt", weights_only=True)
    assert saved["attributes"]["beta"] == 0.05 and saved["adapters"] == ["actor", "reference"]
    assert saved["lora_config"]["r"] == 16
    with pytest.raises(pickle.UnpicklingError):  # sanity: the safe loader is what refuses objects
        torch.load(_write_object(tmp_path / "object.pt"), weights_only=True)


def _write_object(file: Path) -> Path:
    torch.save({"config": CosineLRScheduleConfig(num_epochs=3)}, file)
    return file


# ---------------------------------------------------------------------------------------------- edge checks
def test_a_base_with_the_same_shapes_but_other_weights_is_refused(
    tiny_model_dir, tokenizer, tmp_path_factory, tmp_path
):
    """Same architecture and shapes, different weights: the fingerprint catches it unless the caller opts out."""
    twin_dir = save_tiny_model(tmp_path_factory.mktemp("twin"), "nano", architecture="qwen2", seed=5)
    trained_on_twin = make_agent(twin_dir, tokenizer)
    learn(trained_on_twin, 0)
    trained_on_twin.save_checkpoint(tmp_path / "ckpt")
    live = make_agent(tiny_model_dir, tokenizer)
    before = weights(live)
    with pytest.raises(CheckpointError, match=r"another base model.*base weights differ.*check_base_model=False"):
        live.load_checkpoint(tmp_path / "ckpt")
    assert_same_weights(before, weights(live))
    live.load_checkpoint(tmp_path / "ckpt", check_base_model=False)  # the caller's explicit choice
    assert_same_weights(weights(trained_on_twin), weights(live), only=".actor.")
    make_agent(twin_dir, tokenizer).load_checkpoint(tmp_path / "ckpt")  # the right base loads


def test_the_fingerprint_ignores_the_dtype_and_the_adapters(tiny_model_dir, tokenizer):
    from agilerl_llm.checkpoint.state import base_fingerprint

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    in_bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    agent = make_agent(tiny_model_dir, tokenizer)
    assert base_fingerprint(plain) == base_fingerprint(in_bf16) == base_fingerprint(agent.actor)
    with torch.no_grad():  # another base: every weight differs (as after full fine-tuning)
        for parameter in plain.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    from agilerl_llm.checkpoint.state import forget_fingerprint

    forget_fingerprint(plain)
    assert base_fingerprint(plain) != base_fingerprint(in_bf16)


@pytest.mark.parametrize(
    ("name", "value"), [("lr", -1.0), ("update_epochs", 0), ("group_size", 1), ("temperature", 0.0)]
)
def test_restored_hyperparameters_are_validated_like_the_constructor(
    trained, tiny_model_dir, tokenizer, tmp_path, name, value
):
    trained.save_checkpoint(tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "attributes.pt"
    saved = torch.load(file, weights_only=True)
    saved["attributes"][name] = value
    torch.save(saved, file)
    live = make_agent(tiny_model_dir, tokenizer)
    before, live_value = weights(live), getattr(live, name)
    with pytest.raises(CheckpointError, match=rf"attributes\.pt holds hyperparameters.*{name}"):
        live.load_checkpoint(file.parent)
    assert getattr(live, name) == live_value
    assert_same_weights(before, weights(live))


def test_garbage_attributes_are_reported_as_corrupt_not_as_pickled_objects(
    trained, tiny_model_dir, tokenizer, tmp_path
):
    trained.save_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "attributes.pt").write_bytes(b"\x00garbage, not an archive" * 10)
    with pytest.raises(CheckpointError, match="not a torch checkpoint archive.*truncated or corrupt"):
        make_agent(tiny_model_dir, tokenizer).load_checkpoint(tmp_path / "ckpt")
