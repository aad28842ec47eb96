"""The spec's ``from agilerl.utils.utils import save_llm_checkpoint``, with ``agilerl_llm`` for ``agilerl``."""

from agilerl_llm.checkpoint.agent import save_llm_checkpoint

__all__ = ["save_llm_checkpoint"]
