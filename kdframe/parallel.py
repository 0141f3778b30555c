"""Data parallelism over processes started by a launcher (torchrun, accelerate launch).

Every method is a no-op with one process, so the training loop has a single code path.
"""

from __future__ import annotations

from typing import Any

import torch


class Processes:
    """This process's rank among ``world`` processes and the collective operations the loop needs."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.device = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over processes, in place."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def any_process(self, flag: bool) -> bool:
        """True on every process when it is true on one (so that all take the same branch)."""
        if self.world == 1:
            return flag
        return bool(self.reduce_sum(torch.tensor([float(flag)], device=self.device)).item())

    def from_main(self, value: Any) -> Any:
        """The main process's ``value`` on every process (a decision that reads files others may write)."""
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            value = broadcast_object_list([value])[0]
        return value

    def gather_in_order(self, items: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """Every process's ``(position, value)`` items, on every process, sorted by position."""
        if self.world > 1:
            from accelerate.utils import gather_object

            items = sorted(gather_object(items), key=lambda item: item[0])
        return items

    def broadcast_parameters(self, modules: list[torch.nn.Module]) -> None:
        """Start every process from the main process's weights, as DDP does (e.g. W_h, drawn from the
        global RNG, which dropout on unequal shares of a batch may have advanced differently)."""
        if self.world > 1:
            for module in modules:
                for tensor in module.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)

    def sum_gradients(self, modules: list[torch.nn.Module]) -> None:
        """Sum every trainable parameter's gradient over processes; each process's loss was weighted by
        its share of the global batch, so the sum is the global batch's gradient.

        An explicit all-reduce rather than DDP (``accelerator.prepare(model)``): plugins receive the
        bare model (kdframe_hf's feature capture reads and sets ``model.config``), which a DDP wrapper
        hides, and the extra modules (W_h) train too. Every process has the same parameters with
        gradients (same models, same graph), so the flat buffers line up.
        """
        if self.world == 1:
            return
        grads = [p.grad for module in modules for p in module.parameters() if p.grad is not None]
        if grads:
            flat = self.reduce_sum(torch.cat([g.reshape(-1).float() for g in grads]))
            for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(summed.view_as(grad))

    def shared_costs(self, costs: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
        """The global batch's cost matrices, identical on every process, for the mapping and the
        layer weights (state that must stay identical everywhere). Detached: a flow is a constant for
        backprop. The loss terms keep the local costs with their graph."""
        if self.world == 1:
            return costs
        return {kind: self.reduce_sum(cost.detach().float() * share).to(cost.dtype) for kind, cost in costs.items()}
