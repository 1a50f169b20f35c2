"""The Grafana dashboard (deploy/grafana/litellm-credits.json) asks only for metrics the plugin
exports, under their exposed names, and imports with a Prometheus data source of the user's
choosing."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY

import litellm_credits.metrics  # noqa: F401  (registers the plugin's metrics)

from .conftest import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "litellm-credits.json"

# what PromQL writes that looks like a name but is not a metric
KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAMES = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels and numbers left out)."""
    bare = _STRINGS.sub('""', expr)
    bare = _MATCHERS.sub("", bare)
    bare = _RANGES.sub("", bare)
    bare = _GROUPINGS.sub("", bare)
    return {n for n in _NAMES.findall(bare) if n not in KEYWORDS and not re.fullmatch(r"[eE]\d+", n)}


def exported() -> set[str]:
    """Every series name the plugin's metrics expose, with their suffixes."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("litellm_credits_")
        for suffix in suffixes.get(family.type, ("",))
    }


def unknown(exprs: list[str]) -> set[str]:
    return {name for e in exprs for name in metric_names(e)} - exported()


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def _exprs() -> list[str]:
    return [t["expr"] for p in _panels(_dashboard()["panels"]) for t in p.get("targets", [])]


def test_every_expression_reads_exported_metrics() -> None:
    exprs = _exprs()
    assert len(exprs) > 20
    assert unknown(exprs) == set()
    read = {n for e in exprs for n in metric_names(e)}
    # what the issue asks the dashboard to show
    for name in (
        "litellm_credits_holds_taken_total",
        "litellm_credits_requests_refused_total",
        "litellm_credits_charged_microcredits_total",
        "litellm_credits_hold_seconds_bucket",
        "litellm_credits_open_holds",
        "litellm_credits_cache_reads_total",
        "litellm_credits_redis_faults_total",
        "litellm_credits_ledger_batch_size_bucket",
    ):
        assert name in read


def test_a_wrong_name_is_caught() -> None:
    assert unknown(["sum(rate(litellm_credits_holds_takn_total[5m]))"]) == {
        "litellm_credits_holds_takn_total"
    }
    # a counter read without its _total, a histogram without _bucket
    assert unknown(["rate(litellm_credits_settlements[5m])"]) == {"litellm_credits_settlements"}
    assert unknown(
        ['histogram_quantile(0.99, sum by (le) (rate(litellm_credits_hold_seconds{a="b"}[1m])))']
    ) == {"litellm_credits_hold_seconds"}


def test_names_are_parsed_out_of_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, tier) (rate(a_bucket{result=~"hit_.*", x="by(y)"}'
        "[$__rate_interval]))) / on (tier) group_left b_total * 1e6 + ignoring(le) c offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_it_imports_with_a_chosen_data_source() -> None:
    dashboard = _dashboard()
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in panel["targets"])
