"""Where metrics go: stdout always, TensorBoard and Weights & Biases when configured."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


class MetricsLogger:
    """Writes namespaced scalar metrics (``reward/mean``, ``loss/policy``...) to the configured sinks.

    Args:
        tensorboard_dir: write TensorBoard event files here (needs the ``tensorboard`` extra).
        wandb_kwargs: keyword arguments for ``wandb.init`` (needs the ``wandb`` extra); None disables W&B.
        print_every: print a line to stdout every this many steps (0 disables printing).
    """

    def __init__(
        self, tensorboard_dir: str | None = None, wandb_kwargs: dict[str, Any] | None = None, print_every: int = 1
    ) -> None:
        self.print_every = print_every
        self._tensorboard = None
        self._wandb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "tensorboard_dir needs TensorBoard: pip install 'agilerl-llm[tensorboard]'."
                ) from error
            self._tensorboard = SummaryWriter(tensorboard_dir)
        if wandb_kwargs is not None:
            try:
                import wandb
            except ImportError as error:
                raise ImportError("Weights & Biases logging needs: pip install 'agilerl-llm[wandb]'.") from error
            self._wandb = wandb.init(**wandb_kwargs)

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run id (saved with checkpoints so a resumed run continues the same W&B run)."""
        return None if self._wandb is None else self._wandb.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one step's metrics in every sink."""
        if self.print_every and step % self.print_every == 0:
            tqdm.write(f"step {step:>5} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
