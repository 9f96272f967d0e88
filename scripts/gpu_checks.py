"""Checks that need a GPU (CI has none): run on a GPU machine with every package installed.

    python scripts/gpu_checks.py

Each check prints PASS or FAIL with its numbers; the exit status is the number of failures.

* ReFT (LoReFT) trains in bf16 on the GPU and ``R`` stays orthonormal;
* LoRA under ``torch.compile(fullgraph=True)`` (inductor) matches eager, forward and a training step;
* every method compiles (whole model, and each decoder layer on its own) with no graph break beyond the
  base model's, in training and inference, under the GPU machine's torch;
* every method runs forward + backward in bf16 on the GPU, adapters in bf16, and adds no device
  synchronisation to the base model's forward pass (counted with the profiler);
* merged equals unmerged in bf16 for LoRA, DoRA, IA3 and VeRA;
* a float32 model trains and infers under bf16 autocast with each method, weights left in float32;
* LoRA under FSDP1 (one process) trains exactly like the plain model;
* on 2 GPUs, ``nn.DataParallel`` gives every method the outputs and adapter gradients of one GPU
  (single adapter and, where the method supports it, ``MultiTask`` with scattered ``task_ids``).
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from torch.profiler import ProfilerActivity, profile

import adapters
from adapters.testing import tiny_inputs, tiny_model

DEVICE = os.environ.get("GPU_CHECKS_DEVICE", "cuda")  # "cpu" only to try the script itself
FAILURES: list[str] = []


def check(name: str):
    def wrap(fn):
        try:
            detail = fn()
            print(f"PASS {name}: {detail}")
        except Exception as exc:  # noqa: BLE001 - report every failing check, then go on
            FAILURES.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=3)
        return fn

    return wrap


def qwen3(task: str = "causal_lm") -> torch.nn.Module:
    model = tiny_model("qwen3", task, hidden_size=64, intermediate_size=128, head_dim=16)
    return model.to(device=DEVICE, dtype=torch.bfloat16)


def batch(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    inputs = tiny_inputs(model, batch=4, seq=32)
    inputs["attention_mask"][0, :5] = 0  # a left-padded row
    return {k: v.to(DEVICE) for k, v in inputs.items()}


@check("reft_bf16_training_keeps_R_orthonormal")
def _reft() -> str:
    model = qwen3()
    adapters.init(model)
    model.add_adapter("r", config="loreft[r=4, prefix_positions=3, suffix_positions=2]")
    model.train_adapter("r")
    model.lm_head.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in params), "ReFT weights are not bf16"
    opt = torch.optim.AdamW(params, lr=5e-2)
    inputs = batch(model)
    losses = []
    for _ in range(30):
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    from adapters_reft.layer import orthonormal_rows

    worst = 0.0
    for layer in model._adapters_state.layers("r"):
        for intervention in layer.adapters["r"].interventions.values():
            r = orthonormal_rows(intervention.rotate_weight).float()
            worst = max(worst, (r @ r.T - torch.eye(r.shape[0], device=r.device)).abs().max().item())
    assert worst < 2e-2, f"R R^T deviates from I by {worst}"
    assert losses[-1] < losses[0], f"loss did not go down: {losses[0]:.4f} -> {losses[-1]:.4f}"
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, max |R R^T - I| = {worst:.2e} (bf16)"


@check("lora_torch_compile_fullgraph_inductor")
def _compile() -> str:
    if DEVICE == "cpu":
        return "skipped on CPU (inductor compile takes minutes there)"
    model = qwen3()
    adapters.init(model)
    model.add_adapter("l", config="lora[r=8, init_weights='bert']", set_active=True)
    inputs = batch(model)
    with torch.no_grad():
        eager = model(**inputs).logits.float()
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(**inputs).logits.float()
    diff = (eager - got).abs().max().item()
    assert diff < 5e-2, f"compiled output differs from eager by {diff}"
    model.train_adapter("l")
    model.lm_head.weight.requires_grad_(False)
    loss = compiled(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), "missing adapter gradients under compile"
    return f"max |eager - compiled| = {diff:.2e} (bf16); training step under compile produced all grads"


def _graph_breaks(model: torch.nn.Module, inputs: dict[str, torch.Tensor], scope: str) -> dict[str, int]:
    """Dynamo's graph breaks (by reason) in two training steps and one inference call of a copy of ``model``
    compiled whole (``scope="model"``) or layer by layer (``"layers"``, regional compilation)."""
    import copy

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = copy.deepcopy(model)
    if scope == "model":
        run = torch.compile(model, backend="eager")
    else:
        for layer in model.model.layers:
            layer.compile(backend="eager")
        run = model
    for _ in range(2):
        run(**inputs, labels=inputs["input_ids"]).loss.backward()
    with torch.no_grad():
        run(**inputs)
    return dict(counters["graph_break"])


@check("every_method_compiles_without_graph_breaks")
def _no_graph_breaks() -> str:
    """The CPU tests trace every method with the CI's torch; this runs the GPU machine's torch (an older one
    broke LoReFT's compiled layer on an ``id()`` of a traced tensor that the CI's torch traces)."""
    methods = ["lora", "dora", "ia3", "vera[r=16]", "seq_bn", "par_bn", "double_seq_bn",
               "compacter[reduction_factor=4]", "loreft", "prefix_tuning", "prompt_tuning"]
    base = qwen3()
    inputs = batch(base)
    base_breaks = {scope: _graph_breaks(base, inputs, scope) for scope in ("model", "layers")}
    found = {}
    for method in methods:
        model = qwen3()
        adapters.init(model)
        model.add_adapter("a", config=method)
        model.train_adapter("a")
        model.lm_head.weight.requires_grad_(False)
        for scope in ("model", "layers"):
            breaks = _graph_breaks(model, inputs, scope)
            # the one documented break: the first compiled training call of a context-carrying method installs
            # the layer frames (compile-disabled; later calls recompile into a whole graph)
            extra = {k: v for k, v in breaks.items()
                     if v > base_breaks[scope].get(k, 0) and "_install_layer_frames" not in k}
            if extra:
                found[f"{method} ({scope})"] = extra
    assert not found, f"graph breaks the base model does not have: {found}"
    return (f"{len(methods)} methods, whole-model and per-layer compile: no graph break beyond the base model's "
            f"({sum(sum(b.values()) for b in base_breaks.values())})")


def _syncs_in_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.no_grad():
        model(**inputs)
    # device synchronisations (cudaStreamSynchronize / cudaDeviceSynchronize, which a .item() on a
    # GPU tensor also issues); .item() on CPU tensors does not wait for the device and is not counted
    return sum(e.count for e in prof.key_averages() if "synchronize" in e.key.lower())


for _config in ["lora", "dora", "ia3", "vera[r=16]", "seq_bn", "par_bn", "double_seq_bn", "loreft", "loreft[r=4]",
                "mtl_lora"]:

    @check(f"bf16_gpu_forward_backward[{_config}]")
    def _run(config: str = _config) -> str:
        model = qwen3()
        base_inputs = batch(model)
        model.eval()
        base_syncs = _syncs_in_forward(model, base_inputs)  # the base model's own (and the profiler's)
        model.train()
        adapters.init(model)
        model.add_adapter("a", config=config)
        model.train_adapter("a")
        model.lm_head.weight.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.bfloat16 for p in trainable), "adapter weights are not bf16"
        inputs = dict(base_inputs)
        if config == "mtl_lora":
            model.set_active_adapters(adapters.MultiTask("a"))
            inputs["task_ids"] = torch.zeros(4, dtype=torch.long)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        assert torch.isfinite(loss), "loss is not finite"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), "no adapter gradient"
        model.eval()
        extra = _syncs_in_forward(model, inputs) - base_syncs
        assert extra == 0, f"{extra} device syncs added to the forward pass"
        return (f"loss {loss.item():.3f}, {sum(p.numel() for p in trainable)} trainable, "
                f"{extra} syncs added to the base model's {base_syncs} in a forward pass")


for _config in ["lora[init_weights='bert']", "dora[init_weights='bert']", "ia3[init_weights='bert']",
                "vera[r=16, vera_b=0.1]"]:

    @check(f"bf16_gpu_merge[{_config}]")
    def _merge(config: str = _config) -> str:
        model = qwen3()
        adapters.init(model)
        model.add_adapter("m", config=config, set_active=True)
        inputs = batch(model)
        with torch.no_grad():
            unmerged = model(**inputs).logits.float()
            model.merge_adapter("m")
            merged = model(**inputs).logits.float()
            model.reset_adapter()
            back = model(**inputs).logits.float()
        diff = (merged - unmerged).abs().max().item()
        assert diff < 0.1, f"merged differs from unmerged by {diff}"
        assert torch.equal(back, unmerged), "reset did not restore the unmerged output exactly"
        return f"max |merged - unmerged| = {diff:.2e} (bf16 rounding); reset exact"


for _config in ["lora", "dora", "ia3", "seq_bn", "loreft"]:

    @check(f"fp32_model_bf16_autocast[{_config}]")
    def _autocast(config: str = _config) -> str:
        model = tiny_model("qwen3", "causal_lm", hidden_size=64, intermediate_size=128, head_dim=16).to(DEVICE)
        adapters.init(model)
        model.add_adapter("a", config=config)
        model.train_adapter("a")
        inputs = batch(model)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            with torch.no_grad():
                model(**inputs)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast changed a weight's dtype"
        assert all(p.grad is None for p in frozen), "a frozen weight got a gradient"
        assert torch.isfinite(loss), "loss is not finite"
        return f"loss {loss.item():.3f}; weights stay float32, frozen ones get no gradient"


@check("fsdp1_flat_parameters_lora_training")
def _fsdp1() -> str:
    """FSDP1 (``use_orig_params=True``, the mode frozen base weights need) trains LoRA exactly like the
    plain model in one process; reports whether the layer saw registered parameters or plain tensor
    views during forward (both are handled: ``adapters.linear.param``)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    plain = qwen3()
    adapters.init(plain)
    plain.add_adapter("a", config="lora[init_weights='bert']")
    plain.train_adapter("a")
    plain.lm_head.weight.requires_grad_(False)
    import copy

    sharded = FullyShardedDataParallel(copy.deepcopy(plain), use_orig_params=True,
                                       device_id=torch.cuda.current_device() if DEVICE == "cuda" else None)
    inputs = batch(plain)
    from adapters_lora.layer import LoRALinear

    probe = next(m for m in sharded.modules() if isinstance(m, LoRALinear))
    seen: dict[str, bool] = {}

    def record(module: torch.nn.Module, args: tuple) -> None:
        seen.setdefault("registered", "weight" in module._parameters)

    handle = probe.register_forward_pre_hook(record)
    losses = []
    for model in (plain, sharded):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        run = []
        for _ in range(3):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    handle.remove()
    assert losses[0][0] == losses[1][0], f"first loss: FSDP1 {losses[1][0]} != plain {losses[0][0]}"
    worst = max(abs(a - b) / abs(a) for a, b in zip(*losses))
    assert worst < 2e-2, f"FSDP1 {losses[1]} vs plain {losses[0]}"
    assert losses[1][-1] < losses[1][0], f"no training progress: {losses[1]}"
    shown = ", ".join(f"{v:.4f}" for v in losses[1])
    how = "registered parameters" if seen.get("registered") else "plain tensor views in place of the parameters"
    return (f"losses {shown} under FSDP1 ({how} during forward), max relative difference to the plain model "
            f"{worst:.1e}")


DP_METHODS = ["lora", "ia3", "dora", "mtl_lora", "seq_bn", "par_bn", "compacter[reduction_factor=4]", "loreft",
              "vera"]


@check("data_parallel_two_gpus_every_method")
def _data_parallel() -> str:
    """``nn.DataParallel`` replicates the model every step and runs replica 1 on GPU 1 in a worker
    thread: each replica must compute with its own weights, so outputs and adapter gradients equal one
    GPU's (float32, TF32 off)."""
    import adapters.composition as ac

    if DEVICE != "cuda" or torch.cuda.device_count() < 2:
        raise RuntimeError(f"needs 2 GPUs, found {torch.cuda.device_count() if DEVICE == 'cuda' else 0}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    worst = 0.0
    done = []
    for method in DP_METHODS:
        model = tiny_model("qwen3", "causal_lm", hidden_size=64, intermediate_size=128, head_dim=16).to("cuda:0")
        adapters.init(model)
        model.add_adapter("a", config=method)
        model.add_adapter("b", config=method)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name in ("a", "b"):
                for p in model._adapters_state.adapter_parameters(name):
                    p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
        method_obj = model._adapters_state.adapters["a"].methods[0]
        setups: list[tuple[object, list[int] | None]] = [("a", None)]
        if "MultiTask" in method_obj.supported_blocks:
            setups.append((ac.MultiTask("a", "b"), [1, 0, 0, 1]))
        for setup, task_ids in setups:
            model.train_adapter(setup)
            model.eval()  # no dropout: both runs compute the same function
            model.lm_head.weight.requires_grad_(False)
            inputs = {k: v.to("cuda:0") for k, v in tiny_inputs(model, batch=4, seq=16).items()}
            kwargs = {} if task_ids is None else {"task_ids": torch.tensor(task_ids, device="cuda:0")}
            results = []
            for wrapped in (model, torch.nn.DataParallel(model, device_ids=[0, 1])):
                model.zero_grad(set_to_none=True)
                logits = wrapped(**inputs, **kwargs).logits
                logits.float().square().mean().backward()
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
                results.append((logits.detach(), grads))
            (single, g1), (parallel, g2) = results
            torch.testing.assert_close(parallel, single, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, method=method, setup=setup: f"{method} {setup!r}: {m}")
            assert g1.keys() == g2.keys() and g1, f"{method}: gradients {sorted(g1)} vs {sorted(g2)}"
            for name, grad in g1.items():
                scale = grad.abs().max().item() or 1.0
                diff = (g2[name] - grad).abs().max().item() / scale
                worst = max(worst, diff)
                assert diff < 1e-3, f"{method} {setup!r}: gradient of {name} differs by {diff:.1e} (relative)"
            done.append(f"{method}:{'MultiTask' if task_ids else 'single'}")
    return f"{len(done)} cases ({', '.join(done)}); worst relative gradient difference {worst:.1e}"


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}")
    print(f"{len(FAILURES)} failed")
    sys.exit(len(FAILURES))
