"""Everything a plugin author needs, in one place: ``from adapters.plugin import ...``.

A method plugin provides configs (:class:`AdapterConfig` dataclasses), one :class:`AdapterMethod`
registered through the ``adapters_register_methods`` hook (:data:`hookimpl`), and
:class:`AdapterLayer` subclasses placed through an :class:`AttachSite`. A layer implements
:meth:`~AdapterLayer.leaf` (one adapter on routed inputs) and, where a block means something
special for it, ``stack`` / ``average`` / ``fuse``; core's :meth:`~AdapterLayer.run_plan` does the
dispatch. Methods that adapt linear projections build on :class:`AdapterLinear` and
:func:`linear_targets`; methods that hook modules inside a Transformer layer find their adapter
layer per call with :func:`frame_child`. The names here are the plugin contract (version
:data:`PLUGIN_API_VERSION`); a test keeps this list exact.
"""

from __future__ import annotations

from .checkpoint_io import (
    CONFIG_FILE,
    LoadedCheckpoint,
    detect_format,
    embedding_tensors,
    head_tensors,
    read_json,
    read_tensors,
)
from .context import ForwardContext, current_context, traced_or_transformed
from .errors import AdapterError, CheckpointError, CompositionError
from .foreign import (
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    PEFT_WEIGHTS_PT,
    Target,
    adapterhub_directory,
    check_model_type,
    default_name,
    layer_index,
    layer_indices,
    local_module_path,
    match_module,
    module_targets,
    peft_weights_path,
    read_config,
    rows_of,
    task_model_path,
)
from .frames import LayerFrame, current_frame, frame_child
from .fused_switch import (
    FusedPathWarning,
    device_programs,
    fused_mode,
    fused_selected,
    kernels_pass,
    set_fused_mode,
)
from .hookspecs import PLUGIN_API_VERSION, hookimpl
from .interface import AdapterModelInterface
from .linear import AdapterLinear, FusedParts, Rows, count_rows, is_linear_like, param, row_index
from .method import ALL_BLOCKS, AdapterConfig, AdapterLayer, AdapterMethod, AttachSite, ConfigUnion
from .module_match import ALL_LINEAR, check_module_fields, names_match, pattern_value, select_modules
from .plan import (
    IDENTITY,
    AveragePlan,
    BatchSplitPlan,
    FusePlan,
    Identity,
    Leaf,
    MultiTaskPlan,
    ParallelPlan,
    PlanNode,
    PlanOps,
    SplitPlan,
    StackPlan,
    execute,
)
from .points import AttentionPoints, FusedQKV, LayerPoints, ModelPoints, ModulePoint, linear_features
from .quantized import adapter_dtype_at
from .shared_ref import SharedRef
from .state import AdapterState
from .targets import (
    LINEAR_HOOK_POINTS,
    LinearTarget,
    check_layer_indices,
    check_linear_placement,
    linear_targets,
    target_config,
)

__all__ = [
    "CONFIG_FILE",
    "PEFT_PREFIX",
    "PEFT_WEIGHTS",
    "PEFT_WEIGHTS_PT",
    "peft_weights_path",
    "pattern_value",
    "FusedPathWarning",
    "device_programs",
    "fused_mode",
    "fused_selected",
    "kernels_pass",
    "set_fused_mode",
    "LoadedCheckpoint",
    "Target",
    "adapterhub_directory",
    "check_model_type",
    "default_name",
    "detect_format",
    "embedding_tensors",
    "head_tensors",
    "layer_index",
    "layer_indices",
    "local_module_path",
    "match_module",
    "names_match",
    "module_targets",
    "read_config",
    "read_json",
    "read_tensors",
    "rows_of",
    "task_model_path",
    "ALL_BLOCKS",
    "adapter_dtype_at",
    "ALL_LINEAR",
    "IDENTITY",
    "LINEAR_HOOK_POINTS",
    "PLUGIN_API_VERSION",
    "AdapterConfig",
    "AdapterError",
    "AdapterLayer",
    "AdapterLinear",
    "AdapterMethod",
    "AdapterModelInterface",
    "AdapterState",
    "AttachSite",
    "AttentionPoints",
    "AveragePlan",
    "BatchSplitPlan",
    "CheckpointError",
    "CompositionError",
    "ConfigUnion",
    "ForwardContext",
    "FusePlan",
    "FusedParts",
    "FusedQKV",
    "Identity",
    "LayerFrame",
    "LayerPoints",
    "Leaf",
    "LinearTarget",
    "ModelPoints",
    "ModulePoint",
    "MultiTaskPlan",
    "ParallelPlan",
    "PlanNode",
    "PlanOps",
    "Rows",
    "SharedRef",
    "SplitPlan",
    "StackPlan",
    "check_layer_indices",
    "check_linear_placement",
    "check_module_fields",
    "count_rows",
    "current_context",
    "traced_or_transformed",
    "current_frame",
    "execute",
    "frame_child",
    "hookimpl",
    "is_linear_like",
    "linear_features",
    "linear_targets",
    "param",
    "row_index",
    "select_modules",
    "target_config",
]
