"""The registry: entry points, validation as registration happens, names, aliases, loading."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import camkit
import camkit.toy
from camkit.registry import Registry
from camkit.testing import check_method, fresh_registry

DISTS = Path(__file__).parent / "fixtures" / "dists"


class Plugin:
    """A plugin object registering the methods it is given."""

    def __init__(self, *methods: Any) -> None:
        self.methods = methods

    @camkit.hookimpl
    def register_methods(self, register: camkit.Register) -> None:
        for m in self.methods:
            register(m)


def _method(name: str, aliases: tuple[str, ...] = (), **attrs: Any) -> camkit.Method:
    cls = type(
        "M",
        (camkit.Method,),
        {
            "name": name,
            "aliases": aliases,
            "citation": "c",
            "cost": "1 forward",
            "needs_gradients": False,
            "weights": lambda self, ctx: ctx.activations.new_ones(ctx.activations.shape[:2]),
            **attrs,
        },
    )
    return cls()


@pytest.fixture
def toy_dist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(DISTS / "good"))
    importlib.invalidate_caches()


def test_builtins_load_through_entry_points() -> None:
    reg = Registry()
    assert "gradcam" in reg.names()
    assert reg.builtins_found
    plugin = {p["name"]: p for p in reg.plugins()}["gradcam"]
    assert plugin["distribution"] == "camkit" and plugin["hooks"] == ["register_methods"]
    assert plugin["methods"] == ["gradcam"]
    assert plugin["version"] == camkit.__version__


def test_third_party_distribution_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    camkit.default_registry()  # loaded before the plugin is on the path, restored after it
    monkeypatch.syspath_prepend(str(DISTS / "good"))
    importlib.invalidate_caches()
    with fresh_registry() as reg:
        assert reg.owner("toy-ones") == "camkit-toy-plugin:toy"
        assert camkit.list_methods("toy*") == ["toy-ones"]
        plugin = {p["name"]: p for p in reg.plugins()}["camkit-toy-plugin:toy"]
        assert plugin["distribution"] == "camkit-toy-plugin" and plugin["version"] == "0.1.0"
        model = camkit.toy.TinyCNN().eval()
        x = torch.randn(2, 3, 8, 8)
        res = camkit.explain(
            model, x, method="ones", layer="features", normalize=False, upsample=None, scale=2.0
        )
        assert res.method == "toy-ones"
        acts = model.features(x)
        torch.testing.assert_close(res.raw, 2.0 * acts.sum(1))
        check_method("toy-ones")
    assert "toy-ones" not in camkit.list_methods()  # the default registry is back


@pytest.mark.parametrize(
    "env,loaded",
    [("", False), ("camkit-toy-plugin", True), ("Camkit_Toy_Plugin, other", True), ("x", False)],
)
def test_load_plugins_variable(
    toy_dist: None, monkeypatch: pytest.MonkeyPatch, env: str, loaded: bool
) -> None:
    monkeypatch.setenv("CAMKIT_LOAD_PLUGINS", env)
    reg = Registry()
    assert ("toy-ones" in reg.names()) is loaded
    assert "gradcam" in reg.names()  # camkit's own always load


def test_broken_plugin_is_reported_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(DISTS / "broken"))
    importlib.invalidate_caches()
    with pytest.raises(camkit.PluginError, match="'broken' of distribution 'camkit-broken-plugin'"):
        Registry()
    monkeypatch.setenv("CAMKIT_LOAD_PLUGINS", "")
    assert "gradcam" in Registry().names()
    sys.modules.pop("camkit_broken_plugin", None)


def test_registration_is_validated() -> None:
    reg = Registry(load_entrypoints=False)
    reg.register_plugin(Plugin(_method("alpha", ("a+",))), name="first")
    assert reg.get("A+").name == "alpha" and reg.get("alpha") is reg.get("a+")
    cases = [
        (_method("alpha"), "'second' registers 'alpha', which plugin 'first' already"),
        (_method("beta", ("a+",)), "registers 'a+', which plugin 'first'"),
        (_method("Bad_Name"), "lowercase words joined by hyphens"),
        (_method("x", ("has space",)), "alias 'has space'"),
        (type(_method("gamma")), "registered the class"),
        (object(), "expected an instance of a camkit.Method subclass"),
        (_method("delta", options={"relu": False}), "redeclares common option"),
        (_method("eps", needs_gradients="yes"), "needs_gradients must be a bool"),
        (_method("zeta", uses_run_suffix=1), "uses_run_suffix must be a bool"),
        (_method("eta", needs_hessian_vector="yes"), "needs_hessian_vector must be a bool"),
        (_method("theta", needs_hessian_vector=True), "set needs_gradients = True"),
        (type("N", (camkit.Method,), {"name": "nowts"})(), "does not implement weights"),
    ]
    for i, (method, message) in enumerate(cases):
        with pytest.raises(camkit.PluginError, match=message.replace("+", r"\+")):
            reg.register_plugin(Plugin(method), name=f"second{i}" if i else "second")
    assert reg.names() == ["alpha"]


def test_plugin_raising_in_hook_and_invalid_hook() -> None:
    class Raises:
        @camkit.hookimpl
        def register_methods(self, register: camkit.Register) -> None:
            raise RuntimeError("oops")

    class WrongHook:
        @camkit.hookimpl
        def register_method(self, register: camkit.Register) -> None:  # misspelt hook
            pass

    reg = Registry(load_entrypoints=False)
    with pytest.raises(camkit.PluginError, match="'raiser' raised in register_methods"):
        reg.register_plugin(Raises(), name="raiser")
    with pytest.raises(camkit.PluginError, match="'wrong' is invalid"):
        reg.register_plugin(WrongHook(), name="wrong")


def test_unknown_method_lists_close_matches() -> None:
    with pytest.raises(camkit.UnknownMethodError) as info:
        camkit.explain(camkit.toy.TinyCNN(), torch.randn(1, 3, 8, 8), method="gradcm")
    msg = str(info.value)
    assert "'gradcm'" in msg and "'gradcam'" in msg and "list_methods" in msg
    empty = Registry(load_entrypoints=False)
    with pytest.raises(camkit.UnknownMethodError, match="install camkit"):
        empty.get("gradcam")


def test_list_methods_is_sorted_and_filtered() -> None:
    reg = Registry(load_entrypoints=False)
    reg.register_plugin(Plugin(_method("zeta"), _method("alpha-two"), _method("alpha")), name="p")
    assert reg.names() == ["alpha", "alpha-two", "zeta"]
    assert reg.names("alpha*") == ["alpha", "alpha-two"]
    assert reg.names("*two") == ["alpha-two"]
    assert camkit.list_methods("grad*") == ["gradcam", "gradcam-elementwise", "gradcampp"]


def test_method_instance_can_be_passed_directly() -> None:
    m = _method("direct")
    res = camkit.explain(camkit.toy.TinyCNN(), torch.randn(1, 3, 8, 8), method=m, layer="features")
    assert res.method == "direct"


def test_failed_plugin_leaves_no_trace() -> None:
    class HalfWay:
        @camkit.hookimpl
        def register_methods(self, register: camkit.Register) -> None:
            register(_method("kept-if-buggy"))
            raise RuntimeError("failed after one registration")

    reg = Registry(load_entrypoints=False)
    with pytest.raises(camkit.PluginError, match="'half' raised in register_methods"):
        reg.register_plugin(HalfWay(), name="half")
    assert reg.names() == [] and reg.plugins() == []
    reg.register_plugin(Plugin(_method("kept-if-buggy")), name="again")  # the name is free
    assert reg.names() == ["kept-if-buggy"]
