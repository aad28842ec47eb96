"""Helpers at the import paths the spec uses (``agilerl_llm.utils.utils``)."""
