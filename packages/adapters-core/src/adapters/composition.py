"""Composition blocks: how several adapters combine in one forward pass.

Blocks are values: immutable children, hashable, equal exactly when they compute the same thing
(names, weights, splits and fusion names included). A ``Stack`` of one child *is* that child: a single
active adapter is ``Stack("copy")`` (as in AdapterHub, whose code compares with ``Stack(...)`` and calls
``flatten()`` / ``first()``), and it also equals, hashes like and prints as ``"copy"``.
``adapters.init``-ed models compile a setup into per-layer plans (:mod:`adapters.plan`) once and cache
them under the block itself. Blocks nest (``Stack("a", Fuse("b", "c"))``) within the rules of
:data:`ALLOWED_NESTING`; every method declares the blocks it supports
(:attr:`adapters.method.AdapterMethod.supported_blocks`) and an
unsupported combination is refused at activation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Union

from .errors import CompositionError

__all__ = [
    "AdapterCompositionBlock",
    "Stack",
    "Fuse",
    "Split",
    "BatchSplit",
    "Parallel",
    "Average",
    "MultiTask",
    "parse_composition",
    "fusion_names",
    "ALLOWED_NESTING",
]

Setup = Union[str, "AdapterCompositionBlock"]


class AdapterCompositionBlock(Sequence):
    """Base class of the composition blocks: an ordered list of children (names or blocks)."""

    def __init__(self, *children: Setup | Sequence[Setup]) -> None:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        if not children:
            raise CompositionError(f"{type(self).__name__}() needs at least one adapter.")
        parsed: list[Setup] = []
        for child in children:
            if isinstance(child, (list, tuple)):
                child = Stack(*child)
            if not isinstance(child, (str, AdapterCompositionBlock)):
                raise CompositionError(
                    f"{type(self).__name__} children must be adapter names or blocks, got {child!r}."
                )
            parsed.append(child)
        #: a tuple: blocks are values (hashable, equal when they compute the same thing)
        self.children: tuple[Setup, ...] = tuple(parsed)

    def __getitem__(self, index):  # type: ignore[override]
        return self.children[index]

    def __len__(self) -> int:
        return len(self.children)

    def __iter__(self) -> Iterator[Setup]:
        return iter(self.children)

    def __eq__(self, other: object) -> bool:
        mine, theirs = _unwrap(self), _unwrap(other)
        if mine is not self or theirs is not other:  # a one-child Stack compares as its child
            return mine == theirs
        return type(self) is type(other) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        inner = _unwrap(self)
        return hash(inner) if inner is not self else hash(self._key())

    def _extra(self) -> tuple:
        return ()

    def _key(self) -> tuple:
        return (type(self).__name__, tuple(self.children), self._extra())

    def __repr__(self) -> str:
        inner = ", ".join(repr(c) for c in self.children)
        extra = "".join(f", {k}={v!r}" for k, v in self._extra_repr())
        return f"{type(self).__name__}({inner}{extra})"

    def _extra_repr(self) -> list[tuple[str, object]]:
        return []

    def __str__(self) -> str:
        """The setup as a reader says it: ``copy`` for ``Stack("copy")`` (one adapter), else the repr."""
        inner = _unwrap(self)
        return inner if isinstance(inner, str) else repr(inner)

    def first(self) -> str:
        """The first adapter name of the setup (depth first), as AdapterHub's blocks have it."""
        child = self.children[0]
        return child if isinstance(child, str) else child.first()

    def last(self) -> str:
        """The last adapter name of the setup (depth first), as AdapterHub's blocks have it."""
        child = self.children[-1]
        return child if isinstance(child, str) else child.last()

    @property
    def name(self) -> str:
        """A readable name for this setup (adapter names joined by the block's symbol)."""
        return ",".join(c if isinstance(c, str) else c.name for c in self.children)

    def flatten(self) -> list[str]:
        """Every adapter name in the setup, in order, without duplicates."""
        names: list[str] = []
        for child in self.children:
            for n in [child] if isinstance(child, str) else child.flatten():
                if n not in names:
                    names.append(n)
        return names


class Stack(AdapterCompositionBlock):
    """Adapters one after another: ``b`` runs on ``a``'s output (LoRA-family deltas add up).

    ``Stack("a")`` is the adapter ``a`` alone (what ``model.active_adapters`` returns after
    ``set_active_adapters("a")``): it equals ``"a"``, hashes like it and prints as ``a``.
    """


def _unwrap(setup: object) -> object:
    """``setup`` without enclosing one-child ``Stack`` blocks (``Stack(Stack("a"))`` -> ``"a"``)."""
    while isinstance(setup, Stack) and len(setup.children) == 1:
        setup = setup.children[0]
    return setup


class Fuse(AdapterCompositionBlock):
    """AdapterFusion over the children's outputs (bottleneck adapters)."""

    def __init__(self, *children: Setup, name: str | None = None) -> None:
        super().__init__(*children)
        self.fusion_name = name or ",".join(c if isinstance(c, str) else c.name for c in self.children)

    def _extra(self) -> tuple:
        return (self.fusion_name,)

    def _extra_repr(self) -> list[tuple[str, object]]:
        default = ",".join(c if isinstance(c, str) else c.name for c in self.children)
        return [] if self.fusion_name == default else [("name", self.fusion_name)]


class Split(AdapterCompositionBlock):
    """Sequence positions ``[0, n1)`` go to the first child, the next ``n2`` to the second, ..."""

    def __init__(self, *children: Setup, splits: int | Sequence[int]) -> None:
        super().__init__(*children)
        splits = [splits] if isinstance(splits, int) else list(splits)
        if len(splits) == len(self.children) - 1:
            splits = [*splits, -1]
        if len(splits) != len(self.children) or any(not isinstance(s, int) for s in splits):
            raise CompositionError(f"Split needs one integer split per child, got splits={splits!r}.")
        self.splits = splits

    def _extra(self) -> tuple:
        return tuple(self.splits)

    def _extra_repr(self):
        return [("splits", self.splits)]


class BatchSplit(AdapterCompositionBlock):
    """Rows of the batch: the first ``n1`` rows to the first child, the next ``n2`` to the second, ..."""

    def __init__(self, *children: Setup, batch_sizes: int | Sequence[int]) -> None:
        super().__init__(*children)
        sizes = [batch_sizes] * len(self.children) if isinstance(batch_sizes, int) else list(batch_sizes)
        if len(sizes) != len(self.children) or any(not isinstance(s, int) or s < 0 for s in sizes):
            raise CompositionError(
                f"BatchSplit needs one non-negative batch size per child, got batch_sizes={batch_sizes!r}."
            )
        self.batch_sizes = sizes

    def _extra(self) -> tuple:
        return tuple(self.batch_sizes)

    def _extra_repr(self):
        return [("batch_sizes", self.batch_sizes)]


class Parallel(AdapterCompositionBlock):
    """The input is replicated along the batch, one copy per child; outputs are concatenated."""


class Average(AdapterCompositionBlock):
    """Weighted average of the children's outputs, weights normalised to sum to 1 (default: equal)."""

    def __init__(self, *children: Setup, weights: Sequence[float] | None = None,
                 normalize_weights: bool = True) -> None:
        super().__init__(*children)
        weights = [1.0] * len(self.children) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.children):
            raise CompositionError(f"Average got {len(weights)} weights for {len(self.children)} adapters.")
        total = sum(weights)
        if normalize_weights:
            if total == 0:
                raise CompositionError("Average weights sum to 0; they cannot be normalised.")
            weights = [w / total for w in weights]
        self.weights = weights

    def _extra(self) -> tuple:
        return tuple(self.weights)

    def _extra_repr(self):
        return [("weights", self.weights)]


class MultiTask(AdapterCompositionBlock):
    """Each row goes to the child named by its ``task_ids`` entry (an index or an adapter name)."""


BLOCKS = (Stack, Fuse, Split, BatchSplit, Parallel, Average, MultiTask)

#: Which blocks may appear directly inside which.
ALLOWED_NESTING: dict[type, tuple[type, ...]] = {
    Stack: (Stack, Fuse, Split, BatchSplit, Average),
    Fuse: (Stack,),
    Split: (Stack, Split, BatchSplit, Average),
    BatchSplit: (Stack, Split, BatchSplit, Average),
    Parallel: (Stack, Split, BatchSplit, Average),
    Average: (Stack, Split, BatchSplit),
    MultiTask: (Stack, Average),
}
#: Blocks that may only stand at the top of a setup (they act on the whole batch layout).
TOP_LEVEL_ONLY = (Parallel, MultiTask)


def fusion_names(setup: Setup | None) -> set[str]:
    """Names of the fusion layers the ``Fuse`` blocks of ``setup`` use (any depth)."""
    if not isinstance(setup, AdapterCompositionBlock):
        return set()
    found = {setup.fusion_name} if isinstance(setup, Fuse) else set()
    for child in setup.children:
        found |= fusion_names(child)
    return found


def parse_composition(setup: Setup | Sequence[Setup] | None) -> AdapterCompositionBlock | str | None:
    """Normalise a user setup: a name, a list (a ``Stack``), a comma string (``"a,b"``) or a block.

    Checks the nesting rules; adapter names are checked against the model later.
    """
    if setup is None:
        return None
    if isinstance(setup, str):
        parts = [p.strip() for p in setup.split(",") if p.strip()]
        if not parts:
            raise CompositionError("An empty adapter name is not a valid setup.")
        return parts[0] if len(parts) == 1 else Stack(*parts)
    if isinstance(setup, (list, tuple)):
        if len(setup) == 1:
            return parse_composition(setup[0])
        setup = Stack(*setup)
    if not isinstance(setup, AdapterCompositionBlock):
        raise CompositionError(f"Cannot use {setup!r} as an adapter setup; pass a name, a list or a block.")
    _check_nesting(setup, parent=None)
    return setup


def _check_nesting(block: AdapterCompositionBlock, parent: AdapterCompositionBlock | None) -> None:
    if parent is not None:
        if isinstance(block, TOP_LEVEL_ONLY):
            raise CompositionError(f"{type(block).__name__} must be the outermost block of a setup, "
                                   f"not inside {type(parent).__name__}.")
        if type(block) not in ALLOWED_NESTING[type(parent)]:
            allowed = ", ".join(b.__name__ for b in ALLOWED_NESTING[type(parent)])
            raise CompositionError(
                f"{type(block).__name__} cannot be nested in {type(parent).__name__} (allowed there: {allowed})."
            )
    for child in block.children:
        if isinstance(child, AdapterCompositionBlock):
            _check_nesting(child, block)
