"""A module used by many adapter layers, held by each of them as an ordinary submodule.

Some adapters share one module between layers (VeRA's random projections, Compacter's shared PHM
rules). Holding it through a plain Python reference breaks whatever torch does to a module tree:
``nn.parallel.replicate`` (``nn.DataParallel``) would leave every replica computing with the
original's tensors, and ``torch.compile`` / pickling see a hidden object. :class:`SharedRef` makes
the shared module a real child of each user, so all of those follow it, and keeps it out of the
user's state dict (it is saved once, where the model owns it: ``adapters_shared.<name>.<key>``).

Listed with duplicates (``named_modules(remove_duplicate=False)``, and so ``named_parameters`` /
``named_buffers``), a shared module appears only where the model owns it, not again under every user: torch's
``torch.func.functional_call`` treats each listed path of one tensor as a tied copy to swap, and with several
paths to one module slot it restored the slot to the substituted tensor, leaving the model computing with a
detached copy of the shared weights after the call (training then silently stopped updating them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["SharedRef"]


class SharedRef(nn.Module):
    """``self.module``: a module owned elsewhere in the model, shared by reference.

    ``state_dict()`` of this wrapper is empty and ``load_state_dict`` does not expect the shared
    module's tensors, so a layer's checkpoint holds only its own weights.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def named_modules(self, memo: set | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
        """As :meth:`nn.Module.named_modules`, except that with ``remove_duplicate=False`` the shared module is
        not listed under this wrapper (see the module docstring); it is where the model owns it."""
        if remove_duplicate:
            yield from super().named_modules(memo, prefix, remove_duplicate)
        else:
            yield prefix, self

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        return OrderedDict() if destination is None else destination

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # the shared module's tensors are not in a user's state dict: offer its current ones, so the
        # child's strict load finds every key (copying a tensor onto itself changes nothing)
        for key, value in self.module.state_dict(keep_vars=True).items():
            state_dict.setdefault(f"{prefix}module.{key}", value)
        super()._load_from_state_dict(state_dict, prefix, *args)
