"""Plugin discovery and the registry: entry points, lazy loading, failures, conflicts, allow-lists.

Installed plugins are simulated for real: each test writes small distributions (a ``*.dist-info``
folder with ``METADATA`` and ``entry_points.txt`` plus a plugin module) into a temporary folder on
``sys.path``, which ``importlib.metadata`` discovers exactly like a pip-installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import adapters
from adapters.plugins import (
    GROUP_EXPORTS,
    GROUP_METHODS,
    PluginError,
    PluginInfo,
    PluginLoadWarning,
    Registry,
)
from adapters.testing import tiny_inputs, tiny_model

GOOD_MODULE = '''
"""A working fake plugin: per-channel scaling of the FFN output projection."""
import dataclasses
from typing import ClassVar

import torch
from torch import nn

import adapters
from adapters.method import AdapterConfig, AdapterLayer, AdapterMethod

IMPORTED = True


@dataclasses.dataclass
class {prefix}Config(AdapterConfig):
    method: ClassVar[str] = "{name}"
    init_scale: float = 1.0


class {prefix}Layer(AdapterLayer):
    def __init__(self, base, location):
        super().__init__(location)
        self.weight, self.bias = base.weight, base.bias

    def add_adapter(self, name, config, site):
        p = nn.Parameter(torch.full((self.weight.shape[0],), config.init_scale, dtype=self.weight.dtype))
        self.adapters[name] = nn.ParameterDict({{"scale": p}})

    def forward(self, x):
        y = nn.functional.linear(x, self.weight, self.bias)
        return y if self.plan is None else y * self.adapters[self.plan.name]["scale"]


class {prefix}Method(AdapterMethod):
    name: ClassVar[str] = "{name}"
    config_classes = ({prefix}Config,)
    presets = {{"{name}": {prefix}Config}}

    def attach(self, site, name, config):
        for lp in site.points.layers:
            layer = site.replace(lp.output, {prefix}Layer, lambda o, p=lp.output: {prefix}Layer(o, p.location))
            layer.add_adapter(name, config, site)


@adapters.hookimpl
def adapters_register_methods(register):
    register({prefix}Method())
'''


def make_dist(root, dist: str, version: str, module: str, *, names: list[str], exports: list[str] = (),
              source: str | None = None) -> None:
    """Write an installed-looking distribution ``dist`` whose entry points all point at ``module``."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = [f"[{GROUP_METHODS}]", *[f"{n} = {module}" for n in names]]
    if exports:
        lines += [f"[{GROUP_EXPORTS}]", *[f"{e} = {module}" for e in exports]]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    if source is not None:
        (root / f"{module}.py").write_text(source)


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """A folder on sys.path holding a good, a broken and two conflicting plugin distributions."""
    tag = tmp_path.name.replace("-", "_").lower()[-12:]
    good, broken = f"fakegood_{tag}", f"fakebroken_{tag}"
    make_dist(tmp_path, "adapters-fake-good", "1.4.2", good, names=["fake_scale"], exports=["FakeScaleConfig"],
              source=GOOD_MODULE.format(prefix="FakeScale", name="fake_scale"))
    make_dist(tmp_path, "adapters-fake-broken", "0.9.1", broken, names=["fake_broken"], exports=["FakeBrokenConfig"],
              source="raise RuntimeError('this plugin is broken on purpose')\n")
    make_dist(tmp_path, "adapters-fake-dup-a", "1.0", f"fakedupa_{tag}", names=["fake_dup"])
    make_dist(tmp_path, "adapters-fake-dup-b", "2.0", f"fakedupb_{tag}", names=["fake_dup"])
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in ("ADAPTERS_DISABLE_PLUGIN_AUTOLOAD", "ADAPTERS_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path, good, broken
    for mod in (good, broken):
        sys.modules.pop(mod, None)


def test_discovery_lists_entry_points_without_importing(fake_site):
    _, good, broken = fake_site
    reg = Registry(autoload=True)
    infos = {(i.group, i.name): i for i in reg.installed()}
    info = infos[(GROUP_METHODS, "fake_scale")]
    assert (info.distribution, info.version, info.module) == ("adapters-fake-good", "1.4.2", good)
    assert (GROUP_EXPORTS, "FakeScaleConfig") in infos
    assert reg.has_config_string("fake_scale") and reg.has_export("FakeScaleConfig")
    assert good not in sys.modules and broken not in sys.modules  # nothing imported yet
    assert (GROUP_METHODS, "qwen3") not in infos
    assert any(i.distribution == "adapters-core" and i.name == "qwen3" for i in reg.installed())


def test_plugin_loads_on_first_use(fake_site):
    _, good, _ = fake_site
    reg = Registry(autoload=True)
    method, factory = reg.config_factory("fake_scale")
    assert good in sys.modules
    assert method.name == "fake_scale" and method.distribution == "adapters-fake-good"
    assert factory is reg.export("FakeScaleConfig")
    assert type(method).__module__ == good


def test_broken_plugin_warns_with_distribution_and_version_and_others_keep_working(fake_site):
    reg = Registry(autoload=True)
    with pytest.warns(PluginLoadWarning) as record:
        with pytest.raises(PluginError) as info:
            reg.method("fake_broken")
    message = str(record[0].message)
    assert "adapters-fake-broken" in message and "0.9.1" in message and "broken on purpose" in message
    assert "adapters-fake-broken" in str(info.value) and "failed to import" in str(info.value)
    # a second request does not import again and does not warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PluginError):
            reg.export("FakeBrokenConfig")
    # the good plugin and core's interfaces are unaffected
    assert reg.method("fake_scale").name == "fake_scale"
    assert reg.interface("qwen3") is not None


def test_name_of_an_installed_but_broken_distribution_is_not_reported_missing(fake_site, monkeypatch):
    """A name its distribution provides without an entry point of that name (first-party config strings) reports
    the distribution's import failure, never "not installed: pip install ..." for what is installed."""
    from adapters import plugins

    monkeypatch.setitem(plugins.FIRST_PARTY_NAMES, "adapters-fake-broken", ("fake_broken_alias",))
    reg = Registry(autoload=True)
    with pytest.warns(PluginLoadWarning):
        reg.load_all()
    with pytest.raises(PluginError, match=r"adapters-fake-broken 0\.9\.1, whose plugin module .* failed to import"):
        reg.config_factory("fake_broken_alias")


def test_load_all_reports_broken_plugins_and_loads_the_rest(fake_site):
    _, good, _ = fake_site
    reg = Registry(autoload=True)
    reg.entry_points()[GROUP_METHODS].pop("fake_dup")  # conflicts are tested separately
    with pytest.warns(PluginLoadWarning, match="adapters-fake-broken 0.9.1"):
        reg.load_all()
    assert "fake_scale" in reg.methods
    assert good in sys.modules


def test_two_distributions_claiming_one_name_is_an_error_naming_both(fake_site):
    reg = Registry(autoload=True)
    with pytest.raises(PluginError) as info:
        reg.method("fake_dup")
    message = str(info.value)
    assert "adapters-fake-dup-a 1.0" in message and "adapters-fake-dup-b 2.0" in message
    assert "ADAPTERS_PLUGINS" in message


def test_injected_conflicting_entry_points_name_both_distributions():
    reg = Registry(autoload=False)
    eps = reg.entry_points()
    eps[GROUP_METHODS]["shiny"] = [
        PluginInfo(GROUP_METHODS, "shiny", "shiny_one.plugin", "adapters-shiny-one", "0.1"),
        PluginInfo(GROUP_METHODS, "shiny", "shiny_two.plugin", "adapters-shiny-two", "3.2"),
    ]
    with pytest.raises(PluginError, match=r"adapters-shiny-one 0\.1.*adapters-shiny-two 3\.2"):
        reg.config_factory("shiny")


def test_allow_list_and_disable_env_vars_in_process(fake_site, monkeypatch):
    monkeypatch.setenv("ADAPTERS_PLUGINS", "adapters-fake-good")
    reg = Registry()
    dists = {i.distribution for i in reg.installed()}
    assert dists == {"adapters-core", "adapters-fake-good"}
    monkeypatch.setenv("ADAPTERS_PLUGINS", "adapters-core")
    assert {i.distribution for i in Registry().installed()} == {"adapters-core"}
    monkeypatch.delenv("ADAPTERS_PLUGINS")
    monkeypatch.setenv("ADAPTERS_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = Registry()
    assert not reg.autoload
    assert {i.distribution for i in reg.installed()} == {"adapters-core"}
    assert not reg.has_config_string("fake_scale")
    assert reg.interface("bert") is not None  # built-in interfaces always load


def _start(code: str, path: str, args: tuple[str, ...] | list[str] = (), **env: str) -> subprocess.Popen:
    """A fresh Python running ``code`` with ``path`` on ``PYTHONPATH`` and only the plugin variables in ``env``."""
    hidden = ("ADAPTERS_DISABLE_PLUGIN_AUTOLOAD", "ADAPTERS_PLUGINS")
    full_env = {k: v for k, v in os.environ.items() if k not in hidden}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join([path, full_env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env)


def _output(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stdout.strip()


def test_env_vars_control_the_global_registry_in_a_fresh_process(fake_site):
    root, good, _ = fake_site
    code = textwrap.dedent(f"""
        import sys, adapters
        from adapters.plugins import registry
        ok = registry.has_config_string("fake_scale")
        print(ok, {good!r} in sys.modules, "torch" in sys.modules)
        if ok and sys.argv[1:] == ["use"]:
            import torch
            from adapters.testing import ToyEncoder, toy_interface
            torch.manual_seed(0)
            model = adapters.init(ToyEncoder(), interface=toy_interface())
            ids = torch.tensor([[1, 2, 3, 4]])
            base = model(ids)
            model.add_adapter("s", config="fake_scale[init_scale=2.0]", set_active=True)
            from adapters import FakeScaleConfig
            print(type(model.adapters_config["s"]) is FakeScaleConfig, {good!r} in sys.modules,
                  not torch.equal(model(ids), base))
    """)
    # each case is a fresh interpreter (the global registry reads the variables when adapters is imported);
    # they run side by side. Discovery imports neither the plugin nor torch; one run uses the plugin end to
    # end through the global registry (on a plain nn.Module: torch only, no transformers import)
    runs = [_start(code, str(root), ADAPTERS_DISABLE_PLUGIN_AUTOLOAD="1"),
            _start(code, str(root), ADAPTERS_PLUGINS="adapters-core, adapters-lora"),
            _start(code, str(root), ADAPTERS_PLUGINS="Adapters-Fake-Good"),
            _start(code, str(root), args=["use"])]
    outputs = [_output(run) for run in runs]
    assert outputs[:3] == ["False False False", "False False False", "True False False"]
    assert outputs[3].splitlines() == ["True False False", "True True True"]


def test_register_plugin_conflicting_method_name_names_both():
    reg = Registry(autoload=False)
    first = _module_plugin("ConflictA", "conflict_name")
    second = _module_plugin("ConflictB", "conflict_name")
    reg.register_plugin(first, distribution="dist-first")
    assert reg.methods["conflict_name"].distribution == "dist-first"
    with pytest.raises(PluginError, match=r"dist-first.*dist-second|dist-second.*dist-first"):
        reg.register_plugin(second, distribution="dist-second")
    assert reg.methods["conflict_name"].distribution == "dist-first"


def test_register_rejects_non_methods_and_bad_declarations():
    reg = Registry(autoload=False)

    class NotAMethod:
        @adapters.hookimpl
        def adapters_register_methods(self, register):
            register(object())

    with pytest.raises(PluginError, match=r"not an adapters\.method\.AdapterMethod"):
        reg.register_plugin(NotAMethod(), distribution="dist-x")

    class BadBlocks(adapters.AdapterMethod):
        name = "bad_blocks"
        supported_blocks = frozenset({"Stack", "Teleport"})

    class BadPlugin:
        @adapters.hookimpl
        def adapters_register_methods(self, register):
            register(BadBlocks())

    with pytest.raises(TypeError, match="Teleport"):
        reg.register_plugin(BadPlugin(), distribution="dist-y")


def _module_plugin(prefix: str, name: str) -> object:
    import types

    module = types.ModuleType(f"inline_{prefix.lower()}")
    sys.modules[module.__name__] = module  # dataclasses look the module up while building the config
    exec(compile(GOOD_MODULE.format(prefix=prefix, name=name), module.__name__, "exec"), module.__dict__)
    return module


def test_in_process_plugin_through_the_global_api(toy):
    model = adapters.init(tiny_model("gpt2", "causal_lm"))
    inputs = tiny_inputs(model)
    with torch.no_grad():
        base = model(**inputs).logits
    assert adapters.registry.method(toy.NAME).distribution == "core-tests"
    assert adapters.registry.export("ToyScaleConfig") is toy.Config
    model.add_adapter("s", config=f"{toy.NAME}[init_scale=0.5]", set_active=True)
    assert model.adapters_config["s"] == toy.Config(init_scale=0.5)
    with torch.no_grad():
        out = model(**inputs).logits
    assert not torch.equal(out, base)
    model.delete_adapter("s")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)


def test_config_string_with_an_unknown_field_names_it_suggests_one_and_lists_the_fields(toy):
    model = adapters.init(tiny_model("gpt2", "causal_lm"))
    keys = list(model.state_dict())
    with pytest.raises(adapters.AdapterError) as info:
        model.add_adapter("s", config=f"{toy.NAME}[init_scal=0.5, colour=1]")
    message = str(info.value)
    assert "ToyScaleConfig has no field 'init_scal' (did you mean 'init_scale'?), 'colour'" in message
    assert "Its fields: fail_at_layer, init_scale, leave_out" in message
    assert "s" not in model.adapters_config and list(model.state_dict()) == keys
