"""agilerl_llm: reinforcement-learning fine-tuning of large language models.

GRPO / GSPO / CISPO on LoRA adapters over one frozen base model, with a fused chunked log-prob op,
HuggingFace rollouts, dataset environments and a population-ready training loop.
"""

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.algorithms.grpo import CISPO, GRPO, GSPO
from agilerl_llm.checkpoint.agent import save_llm_checkpoint
from agilerl_llm.envs.reasoning import PromptBatch, ReasoningGym, RewardFunctionError
from agilerl_llm.optim import CosineLRScheduleConfig
from agilerl_llm.rollout.base import ActionResult, SamplingSettings
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.reasoning import finetune_llm_reasoning

__version__ = "0.1.0"

__all__ = [
    "CISPO",
    "GRPO",
    "GSPO",
    "ActionResult",
    "CosineLRScheduleConfig",
    "LLMAlgorithm",
    "MetricsLogger",
    "PromptBatch",
    "ReasoningGym",
    "RewardFunctionError",
    "SamplingSettings",
    "finetune_llm_reasoning",
    "save_llm_checkpoint",
]
