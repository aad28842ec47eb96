"""The algorithms, importable as the spec writes them: ``from agilerl_llm.algorithms import GRPO``."""

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.algorithms.dpo import DPO
from agilerl_llm.algorithms.grpo import CISPO, GRPO, GSPO
from agilerl_llm.algorithms.ppo import LLMPPO
from agilerl_llm.algorithms.reinforce import LLMReinforce
from agilerl_llm.algorithms.sft import SFT

__all__ = ["CISPO", "DPO", "GRPO", "GSPO", "LLMPPO", "SFT", "LLMAlgorithm", "LLMReinforce"]
