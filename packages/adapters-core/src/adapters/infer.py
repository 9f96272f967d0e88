"""Infer an :class:`~adapters.interface.AdapterModelInterface` for a model that has none registered.

``adapters.init(model, interface="auto")`` calls :func:`infer_interface` when no interface is
registered for the model type. Inference looks only at the model itself (module classes, attribute
names, projection shapes), downloads nothing, and has two stages:

1. **Structure** (always): the layer stacks are the outermost ``ModuleList``/``Sequential`` containers
   of same-class blocks that hold an attention. Inside a block, the attention is found from its
   projections: a query/key/value triple named like ``q_proj``/``k_proj``/``v_proj`` (``query``,
   ``q``, ``q_lin``, ``wq``, ...) or one fused projection (``qkv_proj``, ``c_attn``, ``Wqkv``,
   ``query_key_value``, ...); the attention module is their parent, or its parent when the output
   projection lives in a sibling submodule (BERT's ``attention.output.dense``). Attention modules
   whose path names cross-attention (``encoder_attn``, ``crossattention``, ``EncDecAttention``, ...)
   become ``layer_cross_attn``. The FFN projections are the linear layers outside the attention
   with the shapes ``hidden -> wider`` (intermediate; a gate branch is skipped) and
   ``wider -> hidden`` (output).
2. **Wiring** (when the model can be run on dummy inputs: a transformers model, or any module whose
   ``forward`` takes ``input_ids``): one no-grad forward on a tiny input, with temporary hooks on
   one layer per stack, records which norm feeds which projection and what it reads. A norm whose
   output is the query projection's input and whose input is the layer input makes the model
   pre-norm (``layer_pre_self_attn`` = that norm); a query projection that reads the layer input
   directly makes it post-norm (``layer_pre_self_attn`` = the attention module, ``layer_ln_1`` = the
   norm that reads ``layer input + attention output``). Two more forwards check the q/k/v layout of
   a fused projection: zeroing its ``v`` rows (``concat`` or ``per_head`` layout, widths from the
   config) must zero the attention output. A fused projection whose layout is not confirmed this way
   is left out (``attn_qkv_proj=None``), since adapting "q" or "v" rows of it could hit the wrong
   rows. Hooks are removed and every module's training flag is restored afterwards; parameters and
   buffers are not touched.

Fields that cannot be determined this way are left unset (``None``); adapter configs that need
them are then refused by ``adapters.init``'s usual checks. The result is always validated with
:func:`adapters.points.resolve_points`.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .interface import AdapterModelInterface
from .linear import is_linear_like
from .points import InterfaceError, linear_features, resolve_path, resolve_points

__all__ = ["infer_interface"]

_Q = ("q_proj", "query", "q", "q_lin", "wq", "Wq", "to_q", "query_proj")
_K = ("k_proj", "key", "k", "k_lin", "wk", "Wk", "to_k", "key_proj")
_V = ("v_proj", "value", "v", "v_lin", "wv", "Wv", "to_v", "value_proj")
_QKV = ("qkv_proj", "c_attn", "Wqkv", "query_key_value", "qkv", "W_pack", "qkv_lin", "in_proj")
_O = ("o_proj", "out_proj", "o", "out_lin", "wo", "Wo", "dense", "c_proj", "out", "to_out", "proj", "output")
_CROSS = ("encoder_attn", "crossattention", "encdecattention", "cross_attn", "cross_attention", "crossattn")
_INTERMEDIATE = ("up_proj", "fc1", "c_fc", "wi", "wi_1", "lin1", "Wi", "gate_up_proj", "dense_h_to_4h", "dense",
                 "up", "fc_in", "w_in")
_OUTPUT = ("down_proj", "fc2", "c_proj", "wo", "lin2", "Wo", "dense_4h_to_h", "dense", "down", "fc_out", "w_out")

_ATTN_FIELDS = ("attn_q_proj", "attn_k_proj", "attn_v_proj", "attn_qkv_proj", "attn_o_proj")
_NORM_FIELDS = ("layer_pre_self_attn", "layer_pre_cross_attn", "layer_pre_ffn", "layer_ln_1", "layer_ln_2")


# ---------------------------------------------------------------------------------------------- structure
@dataclass
class _Attention:
    """One attention module found in a layer; paths are relative to the layer."""

    path: str
    proj: dict[str, str]  # "q"/"k"/"v"/"qkv"/"o" -> path relative to the layer

    @property
    def first(self) -> str:
        return self.proj.get("q") or self.proj["qkv"]

    @property
    def proj_parent(self) -> str:
        return _parent(self.first)

    def relative(self) -> dict[str, str]:
        names = {"q": "attn_q_proj", "k": "attn_k_proj", "v": "attn_v_proj", "qkv": "attn_qkv_proj",
                 "o": "attn_o_proj"}
        return {names[w]: p[len(self.path) + 1:] for w, p in self.proj.items()}


@dataclass
class _Layer:
    """What one layer of a stack looks like; every path is relative to the layer."""

    self_attn: _Attention
    cross_attn: _Attention | None = None
    intermediate: str | None = None
    output: str | None = None
    hidden: int = 0
    norms: dict[str, str] = field(default_factory=dict)
    qkv_layout: str | None = None


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _last(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _under(path: str, prefix: str) -> bool:
    return bool(prefix) and (path == prefix or path.startswith(prefix + "."))


def _is_norm(module: nn.Module) -> bool:
    rms = getattr(nn, "RMSNorm", ())
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, *((rms,) if rms else ()))) or "Norm" in type(module).__name__


def _find_attentions(linears: dict[str, nn.Module]) -> list[_Attention]:
    found: list[_Attention] = []
    for path, module in linears.items():
        parent, name = _parent(path), _last(path)
        if not parent:
            continue
        proj: dict[str, str] = {}
        if name in _Q:
            for which, names in (("k", _K), ("v", _V)):
                hit = [f"{parent}.{n}" for n in names if f"{parent}.{n}" in linears]
                if len(hit) != 1:
                    break
                proj[which] = hit[0]
            else:
                proj["q"] = path
            if "q" not in proj:
                continue
        elif name in _QKV:
            n_in, n_out = linear_features(module)
            if n_out <= n_in:
                continue
            proj["qkv"] = path
        else:
            continue
        used = set(proj.values())
        outs = [p for p in linears if _parent(p) == parent and _last(p) in _O and p not in used]
        attn_path = parent
        if not outs:
            grand = _parent(parent)
            if grand:  # BERT: attention.self.{query,key,value} + attention.output.dense
                outs = [p for p in linears if _under(p, grand) and not _under(p, parent) and _last(p) in _O]
                attn_path = grand
        if len(outs) > 1:  # prefer the conventional names, in order
            ranked = sorted(outs, key=lambda p: _O.index(_last(p)))
            outs = [ranked[0]] if _O.index(_last(ranked[0])) < _O.index(_last(ranked[1])) else []
        if len(outs) == 1:
            proj["o"] = outs[0]
        else:
            attn_path = parent
        found.append(_Attention(path=attn_path, proj=proj))
    return found


def _pick(candidates: list[str], names: tuple[str, ...]) -> str | None:
    if len(candidates) == 1:
        return candidates[0]
    named = [c for c in candidates if _last(c) in names]
    return named[0] if len(named) == 1 else None


def _analyse_layer(layer: nn.Module) -> _Layer | None:
    """Attention and FFN projections of one layer, or ``None`` if it holds no recognisable attention."""
    linears = {name: m for name, m in layer.named_modules() if name and is_linear_like(m)}
    attentions = _find_attentions(linears)
    selfs = [a for a in attentions if not any(c in a.path.lower() for c in _CROSS)]
    crosses = [a for a in attentions if any(c in a.path.lower() for c in _CROSS)]
    if len(selfs) != 1:
        return None
    info = _Layer(self_attn=selfs[0])
    if len(crosses) == 1 and crosses[0].relative().keys() == selfs[0].relative().keys() \
            and crosses[0].relative() == selfs[0].relative():
        info.cross_attn = crosses[0]
    info.hidden = linear_features(linears[info.self_attn.first])[0]
    inside = [a.path for a in attentions]
    rest = {p: m for p, m in linears.items() if not any(_under(p, a) for a in inside)}
    shapes = {p: linear_features(m) for p, m in rest.items()}
    hidden = info.hidden
    ups = [p for p, (i, o) in shapes.items() if i == hidden and o > hidden
           and not (("gate" in _last(p).lower() and "gate_up" not in _last(p).lower()) or _last(p) == "wi_0")]
    downs = [p for p, (i, o) in shapes.items() if o == hidden and i > hidden]
    info.intermediate = _pick(ups, _INTERMEDIATE)
    info.output = _pick(downs, _OUTPUT)
    return info


def _find_stacks(base: nn.Module) -> list[tuple[str, nn.Module, _Layer]]:
    """Outermost containers of same-class layers that hold an attention, in module order."""
    stacks: list[tuple[str, nn.Module, _Layer]] = []
    for path, module in base.named_modules():
        if not path or not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        if any(_under(path, s[0]) for s in stacks):
            continue
        if len({type(child) for child in module}) != 1:
            continue
        info = _analyse_layer(module[-1])
        if info is not None:
            stacks.append((path, module, info))
    return stacks


def _variants(layer: nn.Module, path: str) -> tuple[str, str]:
    """``path`` with container indices as written (positive) and counted from the end (negative)."""
    module, neg = layer, []
    for step in path.split("."):
        if step.isdigit() and isinstance(module, (nn.ModuleList, nn.Sequential)):
            neg.append(str(int(step) - len(module)))
        else:
            neg.append(step)
        module = getattr(module, step) if not step.isdigit() else module[int(step)]
    return path, ".".join(neg)


def _unify(entries: list[tuple[nn.Module, str | None]]) -> str | None:
    """One path that names the same position in every layer of ``entries`` (``None`` if there is none)."""
    if not entries or any(p is None for _, p in entries):
        return None
    variants = [_variants(layer, path) for layer, path in entries]
    for k in (0, 1):
        if len({v[k] for v in variants}) == 1:
            return variants[0][k]
    return None


def _embeddings(base: nn.Module, stacks: list[str], vocab: int | None) -> str | None:
    children = dict(base.named_children())
    top = {n: m for n, m in children.items() if isinstance(m, nn.Embedding)}
    if top:
        if vocab is not None:
            match = [n for n, m in top.items() if m.num_embeddings == vocab]
            if len(match) == 1:
                return match[0]
        return max(top, key=lambda n: top[n].num_embeddings)
    named = [n for n, m in children.items() if "embed" in n.lower() and not any(_under(s, n) for s in stacks)]
    if len(named) == 1:
        return named[0]
    deep = [p for p, m in base.named_modules() if isinstance(m, nn.Embedding) and not any(_under(p, s) for s in stacks)
            and (vocab is None or m.num_embeddings == vocab)]
    return deep[0] if len(deep) == 1 else None


# ---------------------------------------------------------------------------------------------- wiring trace
def _first_tensor(args: tuple, kwargs: dict | None = None) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    kwargs = kwargs or {}
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal values (up to flattening the leading dimensions)."""
    if a is None or b is None or a.numel() != b.numel() or a.shape[-1] != b.shape[-1]:
        return False
    return bool(torch.allclose(_flat(a).float(), _flat(b).float(), rtol=1e-4, atol=1e-5))


@dataclass
class _Call:
    order: int
    inp: torch.Tensor | None = None
    out: torch.Tensor | None = None


class _Recorder:
    """Temporary hooks recording the first call of selected modules (call order, first input, output)."""

    def __init__(self) -> None:
        self.calls: dict[tuple[int, str], _Call] = {}
        self.handles: list[Any] = []
        self.counter = 0
        self.edit: tuple[int, str, Any] | None = None  # (stack, path, fn(output) -> output)

    def watch(self, stack: int, path: str, module: nn.Module) -> None:
        key = (stack, path)

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if key not in self.calls:
                self.counter += 1
                self.calls[key] = _Call(self.counter, _first_tensor(args, kwargs))

        def post(_m: nn.Module, _args: tuple, output: Any) -> Any:
            call = self.calls.get(key)
            out = output if isinstance(output, torch.Tensor) else (
                output[0] if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor)
                else None)
            if call is not None and call.out is None:
                call.out = out
            if self.edit is not None and self.edit[:2] == key and isinstance(output, torch.Tensor):
                return self.edit[2](output)
            return None

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post))

    def get(self, stack: int, path: str | None) -> _Call | None:
        return self.calls.get((stack, path)) if path is not None else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _dummy_inputs(model: nn.Module, vocab: int | None) -> dict[str, Any] | None:
    """Tiny deterministic inputs for one forward, or ``None`` if the model's inputs are unknown."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    config = getattr(model, "config", None)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    main = getattr(model, "main_input_name", "input_ids")
    inputs: dict[str, Any] = {}
    if main == "pixel_values" and "pixel_values" in params:
        size = getattr(config, "image_size", None)
        channels = getattr(config, "num_channels", 3)
        if size is None:
            return None
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        values = torch.sin(torch.arange(channels * h * w, dtype=torch.float32) * 0.37)
        inputs["pixel_values"] = values.reshape(1, channels, h, w).to(device=device, dtype=dtype)
    elif "input_ids" in params and vocab:
        ids = [(4 + i) % vocab for i in range(4)]
        if getattr(config, "is_encoder_decoder", False):
            eos = getattr(config, "eos_token_id", None)
            if isinstance(eos, int):
                ids[-1] = eos
            if "decoder_input_ids" in params:
                start = getattr(config, "decoder_start_token_id", None)
                start = start if isinstance(start, int) else 0
                inputs["decoder_input_ids"] = torch.tensor([[start, *ids[:3]]], device=device)
        inputs["input_ids"] = torch.tensor([ids], device=device)
        width = getattr(config, "hidden_size", None)
        if getattr(config, "add_cross_attention", False) and "encoder_hidden_states" in params and \
                isinstance(width, int):
            states = torch.sin(torch.arange(4 * width, dtype=torch.float32) * 0.61).reshape(1, 4, width)
            inputs["encoder_hidden_states"] = states.to(device=device, dtype=dtype)
    else:
        return None
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def _norm_fields(rec: _Recorder, s: int, layer: nn.Module, info: _Layer) -> dict[str, str]:
    """The residual hook points of one traced layer (paths relative to it); empty if unclear."""
    norms = [p for p, m in layer.named_modules() if p and _is_norm(m)]
    layer_in = rec.get(s, "").inp if rec.get(s, "") else None
    sa = info.self_attn
    q, o = rec.get(s, sa.first), rec.get(s, sa.proj.get("o"))
    if layer_in is None or q is None:
        return {}
    calls = {p: rec.get(s, p) for p in norms if rec.get(s, p) is not None}
    out: dict[str, str] = {}
    before_q = [p for p, c in calls.items() if c.order < q.order and _same(c.out, q.inp) and _same(c.inp, layer_in)]
    if before_q:
        mode = "pre"
        out["layer_pre_self_attn"] = max(before_q, key=lambda p: calls[p].order)
    elif _same(q.inp, layer_in):
        mode = "post"
        for path in (sa.proj_parent, sa.first):  # the module holding q/k/v; else (a container) the projection
            holder = rec.get(s, path)
            if holder is not None and _same(holder.inp, layer_in):
                out["layer_pre_self_attn"] = path
                break
        if o is not None:
            ln1 = [p for p, c in calls.items() if c.order > o.order and c.inp is not None and o.out is not None
                   and o.out.shape == layer_in.shape and _same(c.inp, layer_in + o.out)]
            if ln1:
                out["layer_ln_1"] = min(ln1, key=lambda p: calls[p].order)
    else:
        return {}
    ca = info.cross_attn
    cq = rec.get(s, ca.first) if ca is not None else None
    if cq is not None:
        if mode == "pre":
            hit = [p for p, c in calls.items() if c.order < cq.order and c.order > q.order and _same(c.out, cq.inp)]
            if hit:
                out["layer_pre_cross_attn"] = max(hit, key=lambda p: calls[p].order)
        else:
            holder = rec.get(s, ca.proj_parent)
            ln1 = calls.get(out.get("layer_ln_1", ""))
            if holder is not None and ln1 is not None and _same(holder.inp, cq.inp) and _same(ln1.out, cq.inp):
                out["layer_pre_cross_attn"] = ca.proj_parent
    up, down = rec.get(s, info.intermediate), rec.get(s, info.output)
    if up is not None:
        fed = [p for p, c in calls.items() if c.order < up.order and _same(c.out, up.inp)]
        if mode == "pre":
            if fed:
                out["layer_pre_ffn"] = max(fed, key=lambda p: calls[p].order)
        else:
            # post-norm: the FFN reads the output of the previous sub-block's norm; with no norm in
            # front of it (norms after each sub-block, as in OLMo2) it reads the residual stream itself
            parent = _parent(info.intermediate)
            holder_path = parent if parent and not _under(sa.path, parent) else info.intermediate
            holder = rec.get(s, holder_path)
            if holder is not None and _same(holder.inp, up.inp):
                out["layer_pre_ffn"] = holder_path
        if mode == "post" and fed:
            if down is not None and down.out is not None and up.inp is not None \
                    and _flat(down.out).shape == _flat(up.inp).shape:
                residual = _flat(up.inp) + _flat(down.out)
                ln2 = [p for p, c in calls.items() if c.order > down.order and _same(c.inp, residual)]
                if ln2:
                    out["layer_ln_2"] = min(ln2, key=lambda p: calls[p].order)
    return out


def _qkv_layout(model: nn.Module, rec: _Recorder, s: int, info: _Layer, inputs: dict[str, Any],
                interface: AdapterModelInterface) -> str | None:
    """``"concat"`` or ``"per_head"``: the layout under which zeroing the ``v`` rows zeroes the attention output."""
    from .points import qkv_sizes

    sa = info.self_attn
    o, qkv = rec.get(s, sa.proj.get("o")), rec.get(s, sa.proj.get("qkv"))
    if o is None or qkv is None or qkv.out is None:
        return None
    for layout in ("concat", "per_head"):
        try:
            fused = qkv_sizes(getattr(model, "config", None), qkv.out.shape[-1],
                               dataclasses.replace(interface, attn_qkv_layout=layout))
        except InterfaceError:
            continue
        rows = fused.index("v")

        def zero_v(y: torch.Tensor, rows: Any = rows) -> torch.Tensor:
            y = y.clone()
            y[..., rows] = 0
            return y

        rec.calls.clear()
        rec.edit = (s, sa.proj["qkv"], zero_v)
        try:
            model(**inputs)
        finally:
            rec.edit = None
        traced = rec.get(s, sa.proj["o"])
        if traced is not None and traced.inp is not None and float(traced.inp.abs().max()) == 0.0:
            return layout
    return None


def _trace(model: nn.Module, stacks: list[tuple[str, nn.Module, _Layer]], vocab: int | None,
           interface: AdapterModelInterface) -> bool:
    """Fill ``norms`` (and the fused layout) of each stack's last-layer analysis; ``False`` if no forward ran."""
    inputs = _dummy_inputs(model, vocab)
    if inputs is None:
        return False
    modes = [(m, m.training) for m in model.modules()]
    rec = _Recorder()
    try:
        for s, (_, container, info) in enumerate(stacks):
            layer = container[-1]
            paths = {"", *(p for p, m in layer.named_modules() if p and _is_norm(m))}
            for attn in (info.self_attn, info.cross_attn):
                if attn is not None:
                    paths.update(attn.proj.values())
                    paths.add(attn.proj_parent)
            for path in (info.intermediate, info.output):
                if path is not None:
                    paths.add(path)
                    if _parent(path):
                        paths.add(_parent(path))
            for path in paths:
                module = layer if not path else resolve_path(layer, path)[2]
                rec.watch(s, path, module)
        model.eval()
        with torch.no_grad():
            try:
                model(**inputs)
            except Exception:  # noqa: BLE001 - any failure just means: no wiring information
                return False
            for s, (_, container, info) in enumerate(stacks):
                info.norms = _norm_fields(rec, s, container[-1], info)
            for s, (_, _, info) in enumerate(stacks):
                if "qkv" in info.self_attn.proj:
                    try:
                        info.qkv_layout = _qkv_layout(model, rec, s, info, inputs, interface)
                    except Exception:  # noqa: BLE001
                        info.qkv_layout = None
    finally:
        rec.remove()
        for module, training in modes:
            module.training = training
    return True


# ---------------------------------------------------------------------------------------------- entry point
def _base(model: nn.Module) -> tuple[nn.Module, str]:
    """The module ``resolve_points`` uses as the base model when ``interface.base_model`` is ``None``."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidate = getattr(model, prefix, None) if prefix else None
    if isinstance(candidate, nn.Module):
        return candidate, prefix
    return model, ""


def infer_interface(model: nn.Module) -> AdapterModelInterface:
    """Infer an :class:`AdapterModelInterface` for ``model`` from its module structure.

    Works for Transformers built from the usual parts (a ``ModuleList`` of layers with q/k/v or
    fused qkv projections, FFN projections, norms), Hugging Face or not; see the module docstring
    for the rules. The model is left exactly as it was (no hooks, same training flags and state).

    :param model: a transformers model or any ``nn.Module`` Transformer.
    :returns: an interface that resolves on ``model`` (``adapter_methods=None``: every method).
        Residual/norm fields are set only when a traced forward determined them.
    :raises InterfaceError: no layer stack with an attention was found, or the result does not resolve.
    """
    base, base_path = _base(model)
    stacks = _find_stacks(base)
    if not stacks:
        raise InterfaceError(
            f"Cannot infer a model interface for {type(model).__name__}: found no layer stack (an nn.ModuleList "
            "of same-class blocks holding an attention with q/k/v projections such as q_proj/k_proj/v_proj, "
            "query/key/value, or a fused one such as qkv_proj/c_attn/Wqkv/query_key_value) under "
            f"'{base_path or '<model>'}'. Write an AdapterModelInterface by hand and pass it: "
            "adapters.init(model, interface=AdapterModelInterface(model_layers=..., layer_self_attn=..., ...))."
        )
    # keep the stacks whose attention looks like the largest stack's (e.g. encoder + decoder)
    ref = max(stacks, key=lambda st: len(st[1]))
    stacks = [st for st in stacks if st is ref or (
        st[2].self_attn.relative() == ref[2].self_attn.relative()
        and _unify([(ref[1][-1], ref[2].self_attn.path), (st[1][-1], st[2].self_attn.path)]) is not None)]
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    vocab = vocab if isinstance(vocab, int) else None
    stack_paths = [st[0] for st in stacks]
    embeddings = _embeddings(base, stack_paths, vocab)
    if vocab is None and embeddings is not None:
        found = resolve_path(base, embeddings)
        if found is not None and isinstance(found[2], nn.Embedding):
            vocab = found[2].num_embeddings

    layers = [st[1][-1] for st in stacks]
    fields: dict[str, Any] = {
        "model_layers": stack_paths[0] if len(stack_paths) == 1 else stack_paths,
        "model_embeddings": embeddings,
        "layer_self_attn": _unify([(lay, st[2].self_attn.path) for lay, st in zip(layers, stacks)]),
        **stacks[0][2].self_attn.relative(),
        "layer_intermediate_proj": _unify([(lay, st[2].intermediate) for lay, st in zip(layers, stacks)]),
        "layer_output_proj": _unify([(lay, st[2].output) for lay, st in zip(layers, stacks)]),
    }
    crosses = [(lay, st[2].cross_attn) for lay, st in zip(layers, stacks) if st[2].cross_attn is not None]
    if crosses and all(c.relative() == stacks[0][2].self_attn.relative() for _, c in crosses):
        fields["layer_cross_attn"] = _unify([(lay, c.path) for lay, c in crosses])
    interface = AdapterModelInterface(**fields, model_type=getattr(config, "model_type", None))
    try:
        resolve_points(model, interface)
    except InterfaceError as exc:
        raise InterfaceError(f"Cannot infer a model interface for {type(model).__name__}: the inferred paths do "
                             f"not resolve on every layer ({exc}). Write an AdapterModelInterface by hand.") from None

    infos = [st[2] for st in stacks]
    traced = _trace(model, stacks, vocab, interface)
    layouts = {info.qkv_layout for info in infos if "qkv" in info.self_attn.proj}
    if interface.attn_qkv_proj is not None:
        if traced and len(layouts) == 1 and None not in layouts:
            interface = dataclasses.replace(interface, attn_qkv_layout=layouts.pop())
        else:  # where q, k and v sit in its outputs is unverified: leave the fused projection out
            interface = dataclasses.replace(interface, attn_qkv_proj=None)
            if interface.attn_o_proj is None:
                raise InterfaceError(
                    f"Cannot infer a model interface for {type(model).__name__}: the only attention projection "
                    f"found is the fused {stacks[0][2].self_attn.proj['qkv']!r}, and where q, k and v sit in its "
                    "outputs could not be confirmed by a traced forward. Write an AdapterModelInterface by hand "
                    "(attn_qkv_proj=..., attn_qkv_layout=..., attn_qkv_split=...)."
                )
    if traced:
        norms: dict[str, Any] = {}
        for name in _NORM_FIELDS:
            entries = [(lay, info.norms.get(name)) for lay, info in zip(layers, infos)]
            if name == "layer_pre_cross_attn":
                entries = [(lay, info.norms.get(name)) for lay, info in zip(layers, infos) if info.cross_attn]
            value = _unify(entries)
            if value is not None:
                norms[name] = value
        if "layer_ln_1" in norms or "layer_ln_2" in norms:  # post-norm needs both norms and both inputs
            if not all(k in norms for k in ("layer_ln_1", "layer_ln_2", "layer_pre_self_attn", "layer_pre_ffn")):
                norms = {}
        candidate = dataclasses.replace(interface, **norms)
        try:
            resolve_points(model, candidate)
            interface = candidate
        except InterfaceError:
            pass
    return interface
