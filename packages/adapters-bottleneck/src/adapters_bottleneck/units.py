"""The modules of bottleneck adapters: one adapter at one location (:class:`Bottleneck`), its PHM
projections (Compacter: :class:`PHMLinear`, :class:`PHMRule`, :class:`PHMWeight`) and AdapterFusion
(:class:`FusionLayer`). :mod:`.layer` places and runs them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from adapters.plugin import AdapterError, SharedRef

from .config import AdapterFusionConfig, BnConfig

__all__ = ["Bottleneck", "FusionLayer", "PHMLinear", "PHMRule", "PHMWeight", "activation", "need_residual"]

Norm = Callable[[torch.Tensor], torch.Tensor]


def activation(name: str) -> nn.Module:
    """The activation module for a ``non_linearity`` name."""
    name = name.lower()
    table: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "gelu_new": lambda: nn.GELU(approximate="tanh"),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "swish": nn.SiLU,
        "silu": nn.SiLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "leakyrelu": nn.LeakyReLU,
        "identity": nn.Identity,
        "linear": nn.Identity,
    }
    if name not in table:
        raise AdapterError(f"Unknown non_linearity {name!r}; use one of {sorted(table)}.")
    return table[name]()


def _init_linear(linear: nn.Linear, scheme: str, role: str) -> None:
    """Initialise a down (``role="down"``) or up projection in float32, then copy."""
    w = torch.empty(linear.weight.shape, dtype=torch.float32)
    if scheme == "bert":
        w.normal_(0.0, 0.02)
    elif scheme == "houlsby":
        nn.init.trunc_normal_(w, std=0.01, a=-0.02, b=0.02)
    elif role == "down":  # mam_adapter
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    else:
        w.zero_()
    with torch.no_grad():
        linear.weight.copy_(w)
        if linear.bias is not None:
            linear.bias.zero_()


# ---------------------------------------------------------------------------------------------- PHM
class PHMRule(nn.Module):
    """The rule matrices ``A_i`` (n × n, i < n) of a PHM layer, optionally factorised ``A_i = u_i v_iᵀ``."""

    def __init__(self, config: BnConfig, dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__()
        n = int(config.phm_dim)
        self.factorized = bool(config.factorized_phm_rule)
        shapes = {"left": (n, n, 1), "right": (n, 1, n)} if self.factorized else {"rule": (n, n, n)}
        for key, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.float32)
            if config.phm_c_init == "normal":
                t.normal_(0.0, float(config.phm_init_range))
            else:
                t.uniform_(-float(config.phm_init_range), float(config.phm_init_range))
            t = t.to(dtype=dtype, device=device)
            if config.learn_phm:
                self.register_parameter(key, nn.Parameter(t))
            else:
                self.register_buffer(key, t)

    def forward(self) -> torch.Tensor:
        """``A`` as an (n, n, n) tensor: ``A[i]`` is the i-th rule matrix."""
        if self.factorized:
            return self.left @ self.right
        return self.rule


class PHMWeight(nn.Module):
    """The blocks ``B_i`` ((in/n) × (out/n)) of a PHM layer, optionally factorised ``B_i = s_i t_iᵀ``."""

    def __init__(self, config: BnConfig, in_features: int, out_features: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> None:
        super().__init__()
        n, rank = int(config.phm_dim), int(config.phm_rank)
        self.factorized = bool(config.factorized_phm_W)
        p, q = in_features // n, out_features // n
        shapes = {"W_left": (n, p, rank), "W_right": (n, rank, q)} if self.factorized else {"W": (n, p, q)}
        for key, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.float32)
            for i in range(n):
                block = t[i]
                if config.hypercomplex_nonlinearity == "glorot-uniform":
                    nn.init.xavier_uniform_(block)
                elif config.hypercomplex_nonlinearity == "glorot-normal":
                    nn.init.xavier_normal_(block)
                elif config.hypercomplex_nonlinearity == "normal":
                    block.normal_(0.0, float(config.phm_init_range))
                else:
                    block.uniform_(-float(config.phm_init_range), float(config.phm_init_range))
            self.register_parameter(key, nn.Parameter(t.to(dtype=dtype, device=device)))


class PHMLinear(nn.Module):
    """A parameterised hypercomplex multiplication layer: ``y = x W + b`` with ``W = Σ_i A_i ⊗ B_i``.

    ``W`` is never built: with ``x`` viewed as (n, in/n), ``y[b, q] = Σ_i Σ_a A_i[a, b] (x[a] B_i)[q]``.
    Rules and blocks may be shared model-level modules (``shared_phm_rule`` / ``shared_W_phm``),
    held through :class:`~adapters.shared_ref.SharedRef`, so they are saved once, under ``shared.<key>``.
    """

    def __init__(self, in_features: int, out_features: int, config: BnConfig, dtype: torch.dtype,
                 device: torch.device | None, rule: PHMRule | None = None, weight: PHMWeight | None = None) -> None:
        super().__init__()
        n = int(config.phm_dim)
        if in_features % n or out_features % n:
            raise AdapterError(f"PHM layer {in_features}→{out_features}: both sizes must be divisible by "
                               f"phm_dim={n}; change reduction_factor or phm_dim.")
        self.n, self.in_features, self.out_features = n, in_features, out_features
        # shared rules / blocks are held through SharedRef: real children (replicas and copies follow
        # them), saved once, under shared.<key>
        self.rule = PHMRule(config, dtype, device) if rule is None else SharedRef(rule)
        self.weight_blocks = (PHMWeight(config, in_features, out_features, dtype, device) if weight is None
                              else SharedRef(weight))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if config.phm_bias else None

    def _rule(self) -> torch.Tensor:
        rule = self.rule
        return rule.module() if isinstance(rule, SharedRef) else rule()

    def _blocks(self) -> PHMWeight:
        blocks = self.weight_blocks
        return blocks.module if isinstance(blocks, SharedRef) else blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self._rule()
        blocks = self._blocks()
        xv = x.reshape(*x.shape[:-1], self.n, self.in_features // self.n)
        if blocks.factorized:
            z = torch.einsum("...ap,ipr->...iar", xv, blocks.W_left)
            z = torch.einsum("...iar,irq->...iaq", z, blocks.W_right)
        else:
            z = torch.einsum("...ap,ipq->...iaq", xv, blocks.W)
        y = torch.einsum("...iaq,iab->...bq", z, a).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the layer's weight blocks."""
        blocks = self._blocks()
        return (blocks.W_left if blocks.factorized else blocks.W).dtype

    def dense_weight(self) -> torch.Tensor:
        """``W = Σ_i A_i ⊗ B_i`` (in × out), for tests and inspection only."""
        blocks = self._blocks()
        b = blocks.W_left @ blocks.W_right if blocks.factorized else blocks.W
        a = self._rule()
        return sum(torch.kron(a[i], b[i]) for i in range(self.n))


# ---------------------------------------------------------------------------------------------- adapter
class Bottleneck(nn.Module):
    """One bottleneck adapter at one location; ``forward(h, x, norm)`` returns ``out`` (see BnConfig)."""

    def __init__(self, config: BnConfig, hidden: int, bottleneck: int, dtype: torch.dtype,
                 device: torch.device | None, phm_shared: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.is_parallel = bool(config.is_parallel)
        self.original_ln_before = bool(config.original_ln_before)
        self.residual_before_ln = config.residual_before_ln
        self.adapter_residual_before_ln = bool(config.adapter_residual_before_ln)
        self.stochastic_depth = float(config.stochastic_depth)
        self.ln_before = nn.LayerNorm(hidden, dtype=dtype, device=device) if config.ln_before else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        if config.phm_layer:
            shared = phm_shared or {}
            self.down = PHMLinear(hidden, bottleneck, config, dtype, device, shared.get("rule_down"),
                                  shared.get("W_down"))
            self.up = PHMLinear(bottleneck, hidden, config, dtype, device, shared.get("rule_up"), shared.get("W_up"))
        else:
            self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
            self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
            _init_linear(self.down, config.init_weights, "down")
            _init_linear(self.up, config.init_weights, "up")
        self.act = activation(config.non_linearity)
        self.ln_after = nn.LayerNorm(hidden, dtype=dtype, device=device) if config.ln_after else None
        self.learned_scaling = config.scaling in ("learned", "channel")
        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1, dtype=dtype, device=device))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device))
        else:
            self.scale_value = float(config.scaling)
        self.gate = nn.Linear(hidden, 1, dtype=dtype, device=device) if config.use_gating else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the adapter's weights have now (it follows ``model.to(dtype)``; read through
        attributes, which ``nn.DataParallel`` replicas have instead of parameters)."""
        return self.up.weight.dtype if isinstance(self.up, nn.Linear) else self.up.dtype

    def adapter_input(self, h: torch.Tensor, x: torch.Tensor | None, norm: Norm) -> torch.Tensor:
        """``h'``: ``x`` (parallel), ``LN(h + x)`` (``original_ln_before``) or ``h``."""
        if self.is_parallel:
            return need_residual(x)
        return norm(h + need_residual(x)) if self.original_ln_before else h

    def forward(self, h: torch.Tensor, x: torch.Tensor | None, norm: Norm) -> torch.Tensor:
        inp = self.adapter_input(h, x, norm)
        if self.is_parallel or self.residual_before_ln is True:
            residual = h
        elif self.residual_before_ln == "post_add":
            residual = h + need_residual(x)
        else:
            residual = inp
        cast = inp.dtype != self.weight_dtype  # only with an explicit config.dtype
        z = inp.to(self.weight_dtype) if cast else inp
        if self.ln_before is not None:
            z = self.ln_before(z)
        if self.dropout is not None:
            z = self.dropout(z)
        a = self.up(self.act(self.down(z)))
        if self.learned_scaling:
            a = a * self.scaling
        elif self.scale_value != 1.0:
            a = a * self.scale_value
        if self.gate is not None:
            g = torch.sigmoid(self.gate(z if self.ln_before is None and self.dropout is None else
                                        (inp.to(self.weight_dtype) if cast else inp)))
            a = a * (g.mean(dim=-2, keepdim=True) if g.dim() >= 3 else g)
        if self.stochastic_depth > 0 and self.training:
            keep = 1.0 - self.stochastic_depth
            shape = (a.shape[0],) + (1,) * (a.dim() - 1)
            a = a * torch.empty(shape, dtype=a.dtype, device=a.device).bernoulli_(keep) / keep
        if cast:
            a = a.to(h.dtype)
        if self.adapter_residual_before_ln:
            out = a + residual
            return self.ln_after(out.to(self.weight_dtype)).to(h.dtype) if self.ln_after is not None else out
        if self.ln_after is not None:
            a = self.ln_after(a.to(self.weight_dtype)).to(h.dtype)
        return a + residual


def need_residual(x: torch.Tensor | None) -> torch.Tensor:
    if x is None:
        raise AdapterError("This bottleneck adapter needs the residual stream, but none was captured at this "
                           "location (the interface's layer_pre_* module did not run before the projection).")
    return x


# ---------------------------------------------------------------------------------------------- fusion
class FusionLayer(nn.Module):
    """AdapterFusion at one location (see :class:`~.config.AdapterFusionConfig`)."""

    def __init__(self, config: AdapterFusionConfig, hidden: int, dtype: torch.dtype,
                 device: torch.device | None) -> None:
        super().__init__()
        self.config = config
        self.query = nn.Linear(hidden, hidden, dtype=dtype, device=device) if config.query else None
        self.key = nn.Linear(hidden, hidden, dtype=dtype, device=device) if config.key else None
        self.value = nn.Linear(hidden, hidden, dtype=dtype, device=device) if config.value else None
        for lin in (self.query, self.key):
            if lin is not None:
                _init_linear(lin, "bert", "down")
        if self.value is not None:
            if config.value_initialized:
                with torch.no_grad():
                    self.value.weight.copy_(torch.eye(hidden))
                    self.value.bias.zero_()
            else:
                _init_linear(self.value, "bert", "down")
        self.dropout = nn.Dropout(config.dropout_prob) if config.dropout_prob else None
        self.anneal = config.temperature is True
        if self.anneal:
            self.register_buffer("temperature", torch.tensor(50.0, dtype=torch.float32, device=device))
        else:
            self.fixed_temperature = 1.0 if config.temperature is False else float(config.temperature)

    def regularization_loss(self) -> torch.Tensor:
        """``‖V - I‖²`` (zero without a value projection)."""
        if self.value is None:
            return torch.zeros(())
        eye = torch.eye(self.value.weight.shape[0], dtype=self.value.weight.dtype, device=self.value.weight.device)
        return ((self.value.weight - eye) ** 2).sum()

    def temperature_for_call(self, scratch: dict | None, key: str) -> torch.Tensor | float:
        """The softmax temperature of this forward call. Annealing (``temperature=True``) lowers the
        stored value once per training call; the value a call used is kept in its layer frame's
        ``scratch``, so gradient checkpointing recomputes the call with it, not a later one."""
        if not self.anneal:
            return self.fixed_temperature
        if scratch is not None and key in scratch:
            return scratch[key]
        value = self.temperature
        if self.training and torch._C._current_graph_task_id() == -1:  # not inside a backward pass
            with torch.no_grad():
                self.temperature = (value * 0.99).clamp(min=1.0)
        if scratch is not None:
            scratch[key] = value
        return value

    def forward(self, h: torch.Tensor, query_input: torch.Tensor, branches: torch.Tensor,
                temperature: torch.Tensor | float | None = None) -> torch.Tensor:
        """Fuse ``branches`` (..., K, d) -- each adapter's output minus ``h`` -- into one output
        (``temperature``: the call's, from :meth:`temperature_for_call`; default: the current one)."""
        cfg = self.config
        q = self.query(query_input) if self.query is not None else query_input
        k = self.key(branches) if self.key is not None else branches
        scores = (k * q.unsqueeze(-2)).sum(-1).float()
        if temperature is None:
            temperature = self.temperature_for_call(None, "")
        scores = scores / temperature
        probs = torch.softmax(scores, dim=-1).to(h.dtype)
        if self.dropout is not None:
            probs = self.dropout(probs)
        if cfg.value_before_softmax:
            v = self.value(branches) if self.value is not None else branches
            ctx = (probs.unsqueeze(-1) * v).sum(-2)
        else:
            ctx = (probs.unsqueeze(-1) * branches).sum(-2)
            ctx = self.value(ctx) if self.value is not None else ctx
        residual = query_input if cfg.residual_before else h
        return residual + ctx
