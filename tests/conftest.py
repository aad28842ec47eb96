"""Shared fixtures: tiny models saved once per session and loaded through from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread: tiny models gain nothing from more, and OpenMP threads that spin-wait on shared
# cores made some tests 80x slower on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~0.1M-parameter Qwen2 model + tokenizer written with save_pretrained."""
    from agilerl_llm.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("nano_qwen2"), "nano", architecture="qwen2")


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama model with tied input/output embeddings."""
    from agilerl_llm.testing import save_tiny_model

    return save_tiny_model(
        tmp_path_factory.mktemp("nano_llama"), "nano", architecture="llama", tie_word_embeddings=True
    )


@pytest.fixture()
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def tiny_model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)
