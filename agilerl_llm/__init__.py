"""agilerl_llm: reinforcement-learning fine-tuning of large language models.

GRPO / GSPO / CISPO, PPO with a value head, REINFORCE, DPO and SFT on LoRA adapters over one frozen base
model, with a fused chunked log-prob op, HuggingFace or colocated vLLM rollouts, dataset environments, population-ready
training loops and an atomic checkpoint grid.
"""

from agilerl_llm.algorithms.base import LLMAlgorithm
from agilerl_llm.algorithms.dpo import DPO
from agilerl_llm.algorithms.grpo import CISPO, GRPO, GSPO
from agilerl_llm.algorithms.ppo import LLMPPO
from agilerl_llm.algorithms.reinforce import LLMReinforce
from agilerl_llm.algorithms.sft import SFT
from agilerl_llm.checkpoint.agent import save_llm_checkpoint
from agilerl_llm.distributed import Distributed, make_accelerator
from agilerl_llm.envs.multiturn import MultiTurnEnv, collect_episodes
from agilerl_llm.envs.preference import PreferenceGym
from agilerl_llm.envs.reasoning import PromptBatch, ReasoningGym, RewardFunctionError
from agilerl_llm.envs.sft import SFTGym
from agilerl_llm.evolution import HyperparameterConfig, Mutations, RLParameter, TournamentSelection, create_population
from agilerl_llm.optim import CosineLRScheduleConfig
from agilerl_llm.rollout.base import ActionResult, SamplingSettings
from agilerl_llm.rollout.vllm import VLLMConfig
from agilerl_llm.training.logging import MetricsLogger
from agilerl_llm.training.multiturn import finetune_llm_multiturn
from agilerl_llm.training.preference import finetune_llm_preference
from agilerl_llm.training.reasoning import finetune_llm_reasoning
from agilerl_llm.training.sft import finetune_llm_sft

__version__ = "0.1.0"

__all__ = [
    "CISPO",
    "DPO",
    "GRPO",
    "GSPO",
    "LLMPPO",
    "SFT",
    "LLMReinforce",
    "PreferenceGym",
    "SFTGym",
    "ActionResult",
    "CosineLRScheduleConfig",
    "Distributed",
    "HyperparameterConfig",
    "LLMAlgorithm",
    "MetricsLogger",
    "MultiTurnEnv",
    "Mutations",
    "PromptBatch",
    "RLParameter",
    "ReasoningGym",
    "RewardFunctionError",
    "SamplingSettings",
    "TournamentSelection",
    "VLLMConfig",
    "collect_episodes",
    "create_population",
    "finetune_llm_multiturn",
    "finetune_llm_preference",
    "finetune_llm_reasoning",
    "finetune_llm_sft",
    "make_accelerator",
    "save_llm_checkpoint",
]
