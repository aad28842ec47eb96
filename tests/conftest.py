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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto's server on loopback with one bucket, for the whole session.

    Yields ``{"endpoint", "bucket", "storage_options"}``; the storage options reach it through s3fs. Skips when
    moto or s3fs is not installed (they come with the dev extra)."""
    import logging
    import socket

    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in credentials.items():
            patch.setenv(name, value)
        patch.setattr(logging.getLogger("werkzeug"), "level", logging.ERROR)  # one log line per request otherwise
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            endpoint, bucket = f"http://127.0.0.1:{port}", "ckpt-bucket"
            client = boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
            client.create_bucket(Bucket=bucket)
            yield {
                "endpoint": endpoint,
                "bucket": bucket,
                "storage_options": {
                    "key": "testing",
                    "secret": "testing",
                    "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
                },
            }
        finally:
            server.stop()
