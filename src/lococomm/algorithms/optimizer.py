"""A torch optimizer that takes part in the manager's step protocol.

    opt = Optimizer(torch.optim.AdamW(model.parameters()), manager)
    opt.zero_grad()        # manager.start_step() if no step is open, then zero the gradients
    loss.backward()
    if opt.step():         # DataParallel.finish(), manager.commit(); inner step only if True
        scheduler.step()

`step()` returns whether the step was committed. On False nothing was applied, the gradients
are zero, and the next `zero_grad()` re-forms the group (and heals); retry the same batch.
Every DataParallel built on the same manager takes part (or pass `models=` explicitly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lococomm.algorithms.data_parallel import DataParallel, attached


class Optimizer:
    """Wraps a `torch.optim.Optimizer`; other attributes (param_groups, state, state_dict,
    load_state_dict, add_param_group) are the wrapped optimizer's."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        manager: Any,
        models: Sequence[DataParallel] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.manager = manager
        self._models = list(models) if models is not None else None
        self.last_committed: bool | None = None

    @property
    def models(self) -> list[DataParallel]:
        return self._models if self._models is not None else attached(self.manager)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Open the step (re-quorum and heal only when needed) and zero the gradients."""
        if not self.manager.in_step:
            self.manager.start_step()
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for model in self.models:
            model.zero_grad()  # gradients back as zeroed views into the buckets

    def step(self, closure: Callable[[], Any] | None = None) -> bool:
        """Average gradients, vote, and apply the update only if every member committed."""
        if closure is not None:
            raise ValueError(
                "lococomm Optimizer does not take a closure: a closure re-runs backward, which "
                "would send the gradients again"
            )
        if not self.manager.in_step:
            raise RuntimeError("step() outside a step: call zero_grad() before the forward pass")
        models = self.models
        for model in models:
            model.finish()  # False marks the step failed in the manager; commit() sees it
        committed = self.manager.commit()
        for model in models:
            model.end_step(committed)
        if committed:
            self.optimizer.step()
        self.last_committed = committed
        return committed

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        if name == "optimizer":  # not set yet (during unpickling / early errors)
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"lococomm.Optimizer({self.optimizer!r})"
