"""Export a trained policy as a plain HuggingFace model: the LoRA adapter merged into the base weights.

The exported folder holds ``config.json``, ``model.safetensors``, ``generation_config.json`` (and the tokenizer
files when a tokenizer is given), so ``AutoModelForCausalLM.from_pretrained(folder)`` loads the trained policy
without PEFT or agilerl_llm. Two entry points:

* ``export_policy(agent, out_dir)`` exports a live agent; the agent itself is left exactly as it was.
* ``export_checkpoint(agent_dir, out_dir, base_model=...)`` exports an agent checkpoint folder (``agent_<i>/`` of
  a run checkpoint, or any ``save_checkpoint(lora_only=True)`` folder) onto its base model; the CLI uses it
  (``agilerl-llm checkpoints export``).

Exports are atomic: the model is written into the hidden sibling ``.<name>.incomplete`` and renamed to ``out_dir``
once complete; an earlier export at ``out_dir`` is replaced only then.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from agilerl_llm.checkpoint import files
from agilerl_llm.checkpoint.files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ATTRIBUTES_FILE, CheckpointError
from agilerl_llm.distributed import is_partitioned
from agilerl_llm.model.adapters import ACTOR
from agilerl_llm.model.quantization import is_quantized, merged_dequantized_model

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from agilerl_llm.algorithms.base import LLMAlgorithm

logger = logging.getLogger(__name__)

# Files whose presence marks a folder as holding a tokenizer ``AutoTokenizer.from_pretrained`` can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MODEL_CONFIG_FILE = "config.json"


# ---------------------------------------------------------------------------------------------- public API
def export_policy(
    agent: LLMAlgorithm,
    out_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    adapter: str = ACTOR,
) -> Path:
    """Write ``agent``'s ``adapter`` merged into its base weights as a plain HuggingFace model in ``out_dir``.

    The live agent does not change: its base weights (same tensors, same values), every adapter, the active
    adapter and hence its log-probs are as before. The merge happens on a copy: every layer LoRA wraps (its base
    weight and adapters) is copied, everything else (embeddings, norms, untargeted layers) is shared read-only.
    **Memory:** the export therefore holds one extra copy of the LoRA-targeted base weights (with the default
    "all-linear" targets, most of the model) on the model's device until it returns.

    Args:
        agent: a plain-process or Accelerate-wrapped agent (the unwrapped actor is exported). Under several
            processes every rank calls it and only the main process writes. ZeRO-3 partitioned weights are not
            supported: save a checkpoint and use ``export_checkpoint``.
        out_dir: the folder to write; an earlier export there is replaced once the new one is complete. A
            non-empty folder that is not a HuggingFace model is never replaced.
        tokenizer: also saved into ``out_dir`` when given (so the folder is self-contained).
        adapter: which adapter to merge ("actor" by default; "reference" or "critic" also work).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    agent.adapters.check_name(adapter)
    out_dir = Path(out_dir)
    actor = agent.actor
    accelerator = agent.accelerator
    if accelerator is not None:
        actor = accelerator.unwrap_model(actor)
    if any(is_partitioned(p) for p in actor.parameters()):
        raise NotImplementedError(
            "export_policy does not gather ZeRO-3 partitioned weights; save a checkpoint "
            "(agent.save_checkpoint(path)) and export it with export_checkpoint / `agilerl-llm checkpoints export`."
        )
    is_main = agent.dist.is_main
    _check_out_dir(out_dir)
    if is_main:
        if is_quantized(actor):
            # Merging into 4-bit / 8-bit weights would round a small LoRA update away: merge into full precision.
            merged = merged_dequantized_model(actor, adapter)
            logger.warning(
                "export_policy: the base model is quantized; %s was merged into a dequantized float32 copy of it, "
                "so %s holds an unquantized float32 model.",
                adapter,
                out_dir,
            )
        else:
            merged = _merged_copy(actor, adapter)
        try:
            _publish_model(merged, out_dir, tokenizer)
        finally:
            del merged
    agent.dist.barrier()
    return out_dir


def export_checkpoint(
    agent_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    adapter: str = ACTOR,
) -> Path:
    """Merge the adapter saved in ``<agent_dir>/<adapter>`` into ``base_model`` and save a HuggingFace model.

    Args:
        agent_dir: an agent checkpoint folder saved with ``lora_only=True`` (e.g. ``global_step_<N>/agent_0``).
        out_dir: the folder to write (atomically, as in ``export_policy``).
        base_model: the base model the run trained on (a folder or name for ``from_pretrained``).
        tokenizer: a folder (or name) to load the tokenizer from; by default the base model's folder when it
            holds tokenizer files, otherwise no tokenizer is written.
        adapter: which adapter folder to merge ("actor" by default).

    Raises:
        FileNotFoundError: ``agent_dir`` or its adapter folder (or a file in it) is missing.
        CheckpointError: a full (``lora_only=False``) checkpoint, a corrupt adapter, or a base model whose shapes
            do not match the adapter.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agilerl_llm.checkpoint.state import check_base_fingerprint

    agent_dir, out_dir = Path(agent_dir), Path(out_dir)
    if not agent_dir.is_dir():
        raise FileNotFoundError(f"No agent checkpoint folder at {agent_dir}.")
    saved = None
    if (agent_dir / ATTRIBUTES_FILE).is_file():
        saved = files.read_attributes(agent_dir)
        if not saved["lora_only"]:
            raise CheckpointError(
                f"{agent_dir} is a full checkpoint (saved with lora_only=False: the weights are in "
                f"{ATTRIBUTES_FILE}, not in adapter folders); exporting it is not supported. Load it into an agent "
                "(agent.load_checkpoint(path)) and call agilerl_llm.checkpoint.export.export_policy(agent, out_dir)."
            )
    adapter_dir = agent_dir / adapter
    for file in (adapter_dir / ADAPTER_CONFIG_FILE, adapter_dir / ADAPTER_WEIGHTS_FILE):
        if not file.is_file():
            what = "folder" if not adapter_dir.is_dir() else "file"
            missing = adapter_dir if what == "folder" else file
            raise FileNotFoundError(
                f"{missing} is missing: {agent_dir} has no {adapter!r} adapter to export "
                f"(adapters there: {sorted(p.name for p in agent_dir.iterdir() if p.is_dir()) or 'none'})."
            )
    _check_out_dir(out_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    _check_adapter_fits_base(adapter_dir, base, base_model)
    if saved is not None:  # the same check as loading into an agent: same shapes but another base is refused too
        check_base_fingerprint(
            saved.get("base_fingerprint"), base, str(agent_dir / ATTRIBUTES_FILE), saved["attributes"].get("model_name")
        )
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=adapter)
    except RuntimeError as error:  # size mismatches our pre-check did not foresee (e.g. embedding LoRA)
        raise CheckpointError(
            f"The adapter in {adapter_dir} does not fit the base model {base_model}: {error}. Pass the base model "
            "the run trained on."
        ) from None
    merged = peft_model.merge_and_unload(safe_merge=True, adapter_names=[adapter])
    tokenizer_source = tokenizer if tokenizer is not None else _tokenizer_folder(base_model)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer_source) if tokenizer_source is not None else None
    _publish_model(merged, out_dir, loaded_tokenizer)
    return out_dir


# ---------------------------------------------------------------------------------------------- merging
@torch.no_grad()
def _merged_copy(actor: PeftModel, adapter: str) -> PreTrainedModel:
    """A plain model: a copy of ``actor`` with ``adapter`` merged in and every LoRA wrapper removed.

    Parameters inside a LoRA layer are deep-copied (the merge writes to them); all others are shared with the live
    model, which nothing here writes to.
    """
    from peft.tuners.lora import LoraLayer

    in_lora_layers: set[int] = set()
    for module in actor.modules():
        if isinstance(module, LoraLayer):
            in_lora_layers.update(id(p) for p in module.parameters())
    memo: dict[int, Any] = {id(p): p for p in actor.parameters() if id(p) not in in_lora_layers}
    merged_peft = copy.deepcopy(actor, memo)
    merged = merged_peft.merge_and_unload(safe_merge=True, adapter_names=[adapter])
    _disable_training_only_settings(merged)
    return merged


def _disable_training_only_settings(model: PreTrainedModel) -> None:
    """Undo what training switched on that should not travel with a deployable model."""
    if getattr(model, "is_activation_checkpointing", False):  # transformers >= 5
        model.activation_checkpointing_disable()
    elif not hasattr(model, "is_activation_checkpointing") and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    model.eval()


def _check_adapter_fits_base(adapter_dir: Path, base: PreTrainedModel, base_model: Any) -> None:
    """Every LoRA A/B pair in the adapter file matches the shape of the base module it wraps (named if not)."""
    weights_file = adapter_dir / ADAPTER_WEIGHTS_FILE
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # SafetensorError for a truncated or damaged file
        raise CheckpointError(f"{weights_file} is truncated or corrupt and cannot be read: {error}") from None
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG_FILE} is corrupt and cannot be parsed: {error}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{adapter_dir} holds a {config.get('peft_type')} adapter; only LoRA can be exported.")
    hint = f"Pass the base model the run trained on (--base-model); {base_model} is not it."
    for key, a_shape in shapes.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module_name = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        b_shape = shapes.get(f"{key[: -len('.lora_A.weight')]}.lora_B.weight")
        try:
            module = base.get_submodule(module_name)
        except AttributeError:
            raise CheckpointError(
                f"{weights_file}: the adapter wraps module {module_name!r}, which the base model {base_model} does "
                f"not have. {hint}"
            ) from None
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or b_shape is None or isinstance(module, torch.nn.Embedding):
            continue  # not a plain linear layer: PEFT's own loading checks it
        adapter_shape = (b_shape[0], a_shape[1])  # (out_features, in_features)
        base_shape = tuple(weight.shape)
        if getattr(module, "fan_in_fan_out", False) or type(module).__name__ == "Conv1D":
            base_shape = base_shape[::-1]
        if adapter_shape != base_shape:
            raise CheckpointError(
                f"{weights_file}: module {module_name!r} has weight shape {base_shape} (out, in) in the base model "
                f"{base_model} but the adapter was trained for {adapter_shape}. {hint}"
            )


# ---------------------------------------------------------------------------------------------- writing
def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything but an earlier export (never a user's folder)."""
    if out_dir.is_file() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} exists and is not a folder; choose another export folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MODEL_CONFIG_FILE).is_file():
        raise FileExistsError(
            f"{out_dir} is a non-empty folder without {MODEL_CONFIG_FILE}, so not an earlier export; refusing to "
            "replace it. Choose a new or empty folder."
        )


def _publish_model(model: PreTrainedModel, out_dir: Path, tokenizer: PreTrainedTokenizerBase | None) -> None:
    staging = out_dir.with_name(f".{out_dir.name}.incomplete")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    files.remove_folder(staging)
    staging.mkdir()
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty target folder: plain rename
        files.publish(staging, out_dir)
    except BaseException:
        files.remove_folder(staging)
        raise


def _tokenizer_folder(base_model: str | os.PathLike) -> Path | None:
    folder = Path(base_model)
    if folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    return None
