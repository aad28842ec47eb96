# CPU image: the quickstart and the test suite run as in CI.
#   docker build -t agilerl-llm .
#   docker run --rm agilerl-llm                      # the quickstart
#   docker run --rm agilerl-llm python -m pytest -q  # the tests
# For GPUs, start from a CUDA base image and install torch's CUDA wheel (plus the deepspeed / vllm /
# liger / bnb extras) instead of the CPU wheel below.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /app
# torch first, from the CPU index, so no CUDA wheels are pulled in by the package's torch requirement.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY agilerl_llm ./agilerl_llm
RUN pip install -e ".[dev]"
COPY . .

CMD ["python", "-m", "agilerl_llm.quickstart"]
