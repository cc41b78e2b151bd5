"""host_tools.fleet.selectors: the selector grammar, and which devices a selector picks."""

from __future__ import annotations

import pytest

from edge_sdk.errors import ConfigError
from host_tools.fleet.selectors import MAX_TERMS, Selector, Term, parse_selector, resolve_selector

PI5 = {"site": "depot-3", "hw": "pi5", "gpu": ""}
PI4 = {"site": "depot-3", "hw": "pi4"}
ELSEWHERE = {"site": "depot-4", "hw": "pi5"}


def test_terms_parse_into_their_parts() -> None:
    sel = parse_selector(" site=depot-3 , hw!=pi4,gpu,id=dev-1")
    assert sel.terms == (
        Term("site", "=", "depot-3"),
        Term("hw", "!=", "pi4"),
        Term("gpu", "exists"),
        Term("id", "=", "dev-1"),
    )
    assert str(sel) == "site=depot-3,hw!=pi4,gpu,id=dev-1"
    assert parse_selector(str(sel)) == sel


@pytest.mark.parametrize(
    "text, selected",
    [
        ("", {"a", "b", "c"}),
        ("site=depot-3", {"a", "b"}),
        ("site=depot-3,hw=pi5", {"a"}),
        ("hw!=pi4", {"a", "c"}),
        ("gpu", {"a"}),
        ("gpu=", {"a"}),  # present with an empty value
        ("rack!=r1", {"a", "b", "c"}),  # absent counts as "not r1"
        ("rack", set()),
        ("id=b", {"b"}),
        ("id!=b,site=depot-3", {"a"}),
        ("site=depot-3,site=depot-4", set()),
    ],
)
def test_comma_is_and_and_each_operator_selects_what_it_says(text: str, selected: set[str]) -> None:
    devices = {"a": PI5, "b": PI4, "c": ELSEWHERE}
    sel = parse_selector(text)
    assert {d for d, labels in devices.items() if sel.matches(d, labels)} == selected


@pytest.mark.parametrize(
    "text, named",
    [
        ("site=depot-3,,hw=pi5", "empty term"),
        ("site=depot-3,", "empty term"),
        ("Site=x", "'Site=x'"),
        ("site=a b", "'site=a b'"),
        ("site==x", "'site==x'"),
        ("id", "needs a device id"),
        ("id=a/b", "'id=a/b'"),
        ("=x", "'=x'"),
        ("!=x", "'!=x'"),
        (",".join(f"k{i}" for i in range(MAX_TERMS + 1)), f"at most {MAX_TERMS}"),
        ("k=" + "v" * 3000, "longer than"),
    ],
)
def test_bad_selectors_are_refused_naming_the_term(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_selector(text)
    assert named in caught.value.message


def test_id_terms_bound_the_devices_a_selector_can_pick() -> None:
    assert parse_selector("site=x").device_ids() is None
    assert parse_selector("id=a,site=x").device_ids() == frozenset({"a"})
    assert parse_selector("id=a,id=b").device_ids() == frozenset()
    assert Selector().matches("any", {})


def test_at_name_resolves_a_saved_group() -> None:
    groups = {"depot3-pi5": "site=depot-3,hw=pi5"}
    assert resolve_selector("@depot3-pi5", groups.get) == parse_selector("site=depot-3,hw=pi5")
    assert resolve_selector("hw=pi4", groups.get) == parse_selector("hw=pi4")
    with pytest.raises(ConfigError, match="no group 'missing'"):
        resolve_selector("@missing", groups.get)
    with pytest.raises(ConfigError, match="bad group name"):
        resolve_selector("@Bad Name", groups.get)
