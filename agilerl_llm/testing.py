"""Tiny offline causal language models and a character-level tokenizer, built in code.

Our machines cannot reach a model hub, so every test, example, benchmark and the quickstart
builds its model here and then goes through the real HuggingFace ``save_pretrained`` /
``from_pretrained`` code paths, exactly as a user's hub checkpoint would.

The tokenizer is character level (one token per byte) plus a few special tokens, and it carries a chat template, so prompts are formatted the same way as for a real
chat model. The models are Qwen2 or Llama architectures at a few sizes:

=======  ==========  ======
size     parameters  layers
=======  ==========  ======
nano     ~0.1M       2
tiny     ~0.8M       4
small    ~4.5M       6
30m      ~30M        10
=======  ==========  ======

Usage::

    from agilerl_llm.testing import save_tiny_model
    path = save_tiny_model("/tmp/tiny", size="tiny")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
UNK_TOKEN = "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS)

# One turn is "<|role|>content<|eos|>"; the generation prompt opens the assistant's turn, so a model
# answers and then closes its turn with the eos token, which is also where generation stops.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSize:
    """Shape of one preset model."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


MODEL_SIZES: dict[str, TinyModelSize] = {
    "nano": TinyModelSize(64, 2, 4, 2, 128),
    "tiny": TinyModelSize(128, 4, 4, 2, 352),
    "small": TinyModelSize(256, 6, 8, 4, 704),
    "30m": TinyModelSize(512, 10, 8, 4, 1536),
}

ARCHITECTURES = ("qwen2", "llama")


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with pad/bos/eos/unk, role tokens and a chat template.

    It is a byte-level BPE with no merges: every byte is one token. Byte level (rather than a plain
    character vocabulary) keeps the tokenizer identical whichever class ``AutoTokenizer`` picks for
    the saved folder (for Qwen2 it rebuilds a byte-level BPE from the vocabulary), and any text,
    not only ASCII, round-trips.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Sort so the ids are stable across runs; printable ASCII then the remapped bytes.
    symbols = sorted(alphabet, key=lambda ch: (ord(ch) > 126, ord(ch)))
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *symbols])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    size: str = "tiny",
    *,
    architecture: str = "qwen2",
    tokenizer: PreTrainedTokenizerFast | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.02,
) -> PreTrainedModel:
    """A randomly initialised causal LM of a preset size whose vocabulary matches the tiny tokenizer.

    Args:
        size: one of ``MODEL_SIZES`` ("nano", "tiny", "small", "30m").
        architecture: "qwen2" or "llama".
        tokenizer: the tokenizer whose vocabulary and special ids the model uses; built if None.
        tie_word_embeddings: share the input embedding with the lm_head.
        seed: weights are a deterministic function of this seed.
        max_position_embeddings: the longest sequence the model accepts.
        initializer_range: std of the random weights. HF's default 0.02 makes a tiny model's output
            nearly uniform and hard to move with LoRA alone (its final RMSNorm caps the logit range);
            RL smoke tests on an untrained model use a larger value such as 0.2.
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"size={size!r} is not a tiny model size; choose one of {sorted(MODEL_SIZES)}.")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r} is not supported; choose one of {list(ARCHITECTURES)}.")
    tokenizer = tokenizer or build_tiny_tokenizer()
    shape = MODEL_SIZES[size]
    config_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if architecture == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=initializer_range,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_tiny_model(
    path: str | Path,
    size: str = "tiny",
    *,
    architecture: str = "qwen2",
    tie_word_embeddings: bool = False,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> Path:
    """Build a tiny model and its tokenizer and write both with ``save_pretrained``; returns the folder."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(
        size,
        architecture=architecture,
        tokenizer=tokenizer,
        tie_word_embeddings=tie_word_embeddings,
        seed=seed,
        initializer_range=initializer_range,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
