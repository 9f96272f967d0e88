"""Whether a PEFT adapter directory is one a multi-LoRA server applies as PEFT would.

Checked against the source of vLLM's LoRA loader (``vllm/lora/peft_helper.py``: ``PEFTHelper`` keeps only
``r``, ``lora_alpha``, ``target_modules``, ``bias``, ``modules_to_save``, ``use_rslora``, ``use_dora``
and a few token options from ``adapter_config.json``; one scaling ``lora_alpha / r`` (``/ sqrt(r)`` with
rsLoRA) for every module; ``validate_legal`` refuses ``r`` above the server's ``max_lora_rank``, a bias,
``modules_to_save`` and DoRA; ``vllm/lora/lora_model.py``: tensors named ``base_model.model.<module>``,
``<module>`` as the model class vLLM serves names it -- the causal-LM class -- whose last component must
be one of the model's LoRA modules). TGI reads the same files through PEFT's ``LoraConfig`` and serves
LoRA only. What those loaders ignore (``rank_pattern``, ``alpha_pattern``) would silently change the
adapter, so a directory that needs them is not servable.
"""

from __future__ import annotations

import math
import os

from ..checkpoint_io import CONFIG_FILE, read_json, tensor_shapes
from ..errors import AdapterError
from ..foreign import PEFT_PREFIX, peft_weights_path
from ..module_match import pattern_value

__all__ = ["servable_problems", "check_servable"]

def servable_problems(directory: str) -> list[str]:
    """What in the PEFT adapter in ``directory`` a LoRA server (vLLM, TGI) would refuse or apply differently
    from PEFT; empty when it serves as trained.

    :raises AdapterError: ``directory`` holds no PEFT adapter."""
    cfg_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise AdapterError(f"{directory} holds no PEFT adapter ({CONFIG_FILE} + adapter_model.safetensors); write "
                           "one with save_adapter(..., format='peft') or adapters convert --to peft.")
    weights = peft_weights_path(directory)
    cfg = read_json(cfg_path)
    problems = []
    if cfg.get("peft_type") != "LORA":
        return [f"peft_type {cfg.get('peft_type')!r}: servers apply LoRA adapters only"]
    if cfg.get("use_dora"):
        problems.append("use_dora: DoRA is refused by vLLM")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']}: trained whole modules (task heads, embeddings) "
                        "are refused by vLLM; merge instead (adapters export-merged)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r}: trained biases are refused by vLLM")
    r, alpha, rslora = cfg.get("r", 8), cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora"))
    served = alpha / (math.sqrt(r) if rslora else r)
    ranks: dict[str, int] = {}
    for key, shape in tensor_shapes(weights).items():  # shapes from the file's header: no tensor is loaded
        if key.endswith((".lora_A.weight", ".lora_embedding_A")):
            module = key[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0]
            ranks[module] = int(shape[0])
    too_big = sorted(m for m, k in ranks.items() if k > r)
    if too_big:
        problems.append(f"modules {too_big[:3]} have a rank above r={r}: servers size their buffers by r")
    differ = []
    for module, rank in sorted(ranks.items()):
        a = pattern_value(cfg.get("alpha_pattern") or {}, (module,), alpha)
        k = pattern_value(cfg.get("rank_pattern") or {}, (module,), r)
        if k != rank:
            problems.append(f"module {module} has rank {rank}, the config says {k}")
            continue
        scaling = a / (math.sqrt(rank) if rslora else rank)
        if abs(scaling - served) > 1e-6 * abs(served):
            differ.append(module)
    if differ:
        problems.append(f"modules {differ[:3]}{' ...' if len(differ) > 3 else ''} need their own scaling "
                        f"(rank_pattern / alpha_pattern), which servers ignore: they would use lora_alpha/r = "
                        f"{served:g}")
    return problems


def check_servable(directory: str) -> None:
    """Raise an :class:`~adapters.errors.AdapterError` listing :func:`servable_problems`, if there are any."""
    problems = servable_problems(directory)
    if problems:
        raise AdapterError(f"{directory} would not be served as trained by vLLM / TGI: " + "; ".join(problems) + ".")
