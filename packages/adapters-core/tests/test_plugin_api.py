"""``adapters.plugin`` is the plugin contract: its public names are exactly these, each importable, and
the method packages of this repository import core only through it."""

from __future__ import annotations

import ast
import os

import adapters.plugin as plugin

EXPECTED = sorted([
    "ALL_BLOCKS", "IDENTITY", "LINEAR_HOOK_POINTS", "PLUGIN_API_VERSION", "AdapterConfig", "AdapterError",
    "AdapterLayer", "AdapterLinear", "AdapterMethod", "AdapterModelInterface", "AdapterState", "AttachSite",
    "AttentionPoints", "AveragePlan", "BatchSplitPlan", "CheckpointError", "CompositionError", "ConfigUnion",
    "ForwardContext", "FusePlan", "FusedParts", "FusedQKV", "Identity", "LayerFrame", "LayerPoints", "Leaf",
    "LinearTarget",
    "ModelPoints", "ModulePoint", "MultiTaskPlan", "ParallelPlan", "PlanNode", "PlanOps", "Rows", "SharedRef",
    "SplitPlan", "StackPlan", "check_linear_placement", "count_rows", "current_context", "current_frame",
    "execute", "frame_child", "hookimpl", "is_linear_like", "linear_features", "linear_targets", "param",
    "row_index", "CONFIG_FILE", "LoadedCheckpoint", "Target", "adapterhub_directory", "check_model_type",
    "default_name", "detect_format", "embedding_tensors", "head_tensors", "layer_index", "layer_indices",
    "match_module", "module_targets", "read_config", "read_json", "read_tensors", "rows_of",
    "ALL_LINEAR", "check_module_fields", "select_modules", "target_config", "local_module_path", "task_model_path",
    "names_match", "PEFT_PREFIX", "PEFT_WEIGHTS", "PEFT_WEIGHTS_PT", "peft_weights_path",
    "pattern_value", "FusedPathWarning", "device_programs", "fused_mode", "fused_selected", "set_fused_mode",
    "kernels_pass",
    "adapter_dtype_at", "check_layer_indices", "traced_or_transformed",
])


def test_public_names_are_exactly_the_contract():
    assert sorted(plugin.__all__) == EXPECTED, "a change to the plugin contract: update EXPECTED and the docs"
    for name in plugin.__all__:
        assert hasattr(plugin, name), name


def test_layers_own_plan_dispatch():
    """A layer is its own PlanOps; run_plan handles no plan, one adapter and compositions."""
    assert issubclass(plugin.AdapterLayer, plugin.PlanOps)
    assert callable(plugin.AdapterLayer.run_plan)


def test_this_repositorys_plugins_use_only_the_public_api():
    """Our method packages (and the example third-party plugin) import core through ``adapters`` and
    ``adapters.plugin`` only (``adapters.testing`` in tests): what they need, an outsider has too."""
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    sources = [os.path.join(repo, "packages", p, "src") for p in os.listdir(os.path.join(repo, "packages"))
               if p != "adapters-core"] + [os.path.join(repo, "tests", "third_party_plugin", "src")]
    checked = 0
    for source in sources:
        for folder, _, files in os.walk(source):
            for file in (f for f in files if f.endswith(".py")):
                tree = ast.parse(open(os.path.join(folder, file), encoding="utf-8").read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adapters."):
                        assert node.module == "adapters.plugin", (file, node.module)
                checked += 1
    assert checked >= 20


def test_first_party_catalogue_matches_the_packages_entry_points():
    """``FIRST_PARTY_NAMES`` (the install hints core gives) is exactly what our method packages declare."""
    import tomllib

    from adapters.plugins import FIRST_PARTY_NAMES, GROUP_EXPORTS, GROUP_METHODS

    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    expected = {}
    for package in sorted(os.listdir(os.path.join(repo, "packages"))):
        if package == "adapters-core":
            continue
        with open(os.path.join(repo, "packages", package, "pyproject.toml"), "rb") as fh:
            project = tomllib.load(fh)["project"]
        points = project.get("entry-points", {})
        expected[project["name"]] = sorted({*points.get(GROUP_METHODS, {}), *points.get(GROUP_EXPORTS, {})})
    got = {dist: sorted(names) for dist, names in FIRST_PARTY_NAMES.items()}
    assert got == expected, f"regenerate adapters.plugins.FIRST_PARTY_NAMES from the entry points: {expected}"


def test_registered_names_without_entry_points_are_reported(toy):
    """An installed plugin whose method registers a config string or export its metadata does not declare
    gets a warning naming each one (such a name works only after another name of the plugin was used)."""
    import pytest

    from adapters.plugins import GROUP_EXPORTS, GROUP_METHODS, PluginInfo, PluginLoadWarning, Registry

    class Extra(toy.Method):
        presets = {toy.NAME: toy.Config, "toy_extra": toy.Config}

    class Plugin:
        @plugin.hookimpl
        def adapters_register_methods(self, register):
            register(Extra())

    registry = Registry(autoload=False)
    registry._entry_points = {GROUP_METHODS: {toy.NAME: [PluginInfo(GROUP_METHODS, toy.NAME, "m", "dist-x", "1")]},
                              GROUP_EXPORTS: {}}
    with pytest.warns(PluginLoadWarning, match=r"adapters.methods: toy_extra; adapters.exports: ToyScaleConfig"):
        registry.register_plugin(Plugin(), distribution="dist-x")
    assert "toy_extra" in registry.config_strings  # reported, still usable


def test_an_interface_plugin_registers_config_variants():
    """What built-in interfaces get, a plugin's get too: a variant for some configurations (here: a model
    whose FFN projections are named differently), chosen by ``adapters.init`` from the model's config
    (and then fitted to the layer stacks the class has, as every registered interface is)."""
    import dataclasses

    import adapters
    from adapters.testing import ToyEncoder, toy_interface

    base = toy_interface()
    renamed_ffn = dataclasses.replace(base, layer_intermediate_proj="ffn.w1", layer_output_proj="ffn.w2")

    class Plugin:
        @plugin.hookimpl
        def adapters_register_model_interfaces(self, register):
            register("toy-variants", base,
                     for_config=lambda config: renamed_ffn if getattr(config, "renamed_ffn", False) else None)

    adapters.register_plugin(Plugin(), distribution="toy-variants-plugin")
    plain = ToyEncoder()
    plain.config.model_type = "toy-variants"
    adapters.init(plain)
    assert plain.adapter_interface.layer_output_proj == "ffn.down"
    renamed = ToyEncoder()
    for block in renamed.blocks:
        block.ffn["w1"], block.ffn["w2"] = block.ffn.pop("up"), block.ffn.pop("down")
    renamed.config.model_type, renamed.config.renamed_ffn = "toy-variants", True
    adapters.init(renamed)  # validates every path of the variant on the model
    assert renamed.adapter_interface.layer_output_proj == "ffn.w2"
