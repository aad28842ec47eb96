"""Evolutionary hyperparameter optimisation of LLM agent populations on one shared base model."""

from agilerl_llm.evolution.hyperparameters import HyperparameterConfig, RLParameter
from agilerl_llm.evolution.mutation import Mutations
from agilerl_llm.evolution.population import create_population
from agilerl_llm.evolution.tournament import TournamentSelection

__all__ = ["HyperparameterConfig", "Mutations", "RLParameter", "TournamentSelection", "create_population"]
