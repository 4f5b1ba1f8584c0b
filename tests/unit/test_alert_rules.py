"""The alert rules and the Grafana dashboard under deploy/observability/ are valid and query only what
the consumer exports.

``promtool`` (Debian package ``prometheus``, installed by ``make system-deps``) checks and unit-tests the
rules and parses every dashboard expression; a PromQL reader below collects the metric names each
expression uses, and every one must be a series ``consumer.metrics`` registers (or ``up``).

The helpers here (expression lists, Grafana variable substitution, metric names, comparison-stripped
probes) are also used by ``tests/integration/test_observability.py``, which runs the same expressions
against a real Prometheus scraping a real consumer.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import consumer.metrics  # noqa: F401  (registers the consumer's metrics in REGISTRY)

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY_DIR = ROOT / "deploy" / "observability"
DASHBOARD_PATH = OBSERVABILITY_DIR / "grafana-dashboard.json"
RULES_PATH = OBSERVABILITY_DIR / "alert-rules.yml"
RULE_TESTS_PATH = OBSERVABILITY_DIR / "alert-rules.test.yml"

SCRAPE_JOB = "cdc-embedder"  # the job name the alert rules expect for `up`
DATASOURCE_VARIABLE = "${DS_PROMETHEUS}"

# What Grafana substitutes for the dashboard's variables: the single job, "All" instances (allValue)
# and its built-in intervals (the integration test scrapes every second, so 1m holds plenty of samples).
GRAFANA_VARIABLES: dict[str, str] = {
    "job": SCRAPE_JOB,
    "instance": ".*",
    "pipeline": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}

REQUIRED_ALERTS = frozenset(
    {
        "CdcEmbedderLagGrowing",
        "CdcEmbedderFreshnessHigh",
        "CdcEmbedderDeadLetters",
        "CdcEmbedderDown",
        "CdcEmbedderNoProgress",
        "CdcEmbedderPartitionsPaused",
        "CdcEmbedderRateLimited",
    }
)
SEVERITIES = frozenset({"critical", "warning", "info"})

# The series the dashboard must chart (issue "See it working").
DASHBOARD_REQUIRED_METRICS = frozenset(
    {
        "cdc_embedder_events_total",
        "cdc_embedder_texts_embedded_total",
        "cdc_embedder_texts_embedded_ahead_unused_total",
        "cdc_embedder_end_to_end_seconds_bucket",
        "cdc_embedder_capture_seconds_bucket",
        "cdc_embedder_consumer_lag_messages",
        "cdc_embedder_consumer_lag_seconds",
        "cdc_embedder_retries_total",
        "cdc_embedder_dead_letters_total",
        "cdc_embedder_batch_size_events_bucket",
        "cdc_embedder_model_seconds_bucket",
        "cdc_embedder_db_seconds_bucket",
        "cdc_embedder_paused_partitions",
        "cdc_embedder_assigned_partitions",
        "cdc_embedder_rebalances_total",
        "cdc_embedder_model_info",
        "cdc_embedder_embed_requests_total",
        "cdc_embedder_embed_request_seconds_bucket",
        "cdc_embedder_embed_requests_in_flight",
        "cdc_embedder_embed_rate_limited_total",
        "cdc_embedder_tokens_billed_total",
        "process_resident_memory_bytes",
    }
)

# Series that exist without the consumer exporting them: the scrape's own `up`, and what
# prometheus_client's default process collector exports on Linux.
STANDARD_METRICS = frozenset(
    {
        "up",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
    }
)

_SAMPLE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


# --------------------------------------------------------------------------------------------------
# Expressions in the dashboard and the rules
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expression:
    origin: str  # where it comes from, for test ids and failure messages
    promql: str  # after Grafana variable substitution


_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def substitute_grafana_variables(expr: str, variables: dict[str, str] | None = None) -> str:
    """Replace ``$var``, ``${var}``, ``${var:fmt}`` and ``[[var]]``; an unknown variable raises."""
    values = GRAFANA_VARIABLES if variables is None else variables

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name not in values:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _GRAFANA_VARIABLE.sub(replace, expr)


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text())
    return dashboard


def dashboard_panels(dashboard: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All panels, including those nested in collapsed rows."""
    board = load_dashboard() if dashboard is None else dashboard
    panels: list[dict[str, Any]] = []
    for panel in board.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_expressions() -> list[Expression]:
    expressions = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            if "expr" in target:
                origin = f"panel {panel['id']} {panel.get('title', '')!r} target {target.get('refId', '?')}"
                expressions.append(Expression(origin, substitute_grafana_variables(target["expr"])))
    return expressions


_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>[a-zA-Z_]\w*)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<query>.+)\)\s*$", re.S)


def dashboard_variable_queries() -> list[Expression]:
    """The PromQL inside the dashboard's query variables (``label_values(<selector>, label)``)."""
    expressions = []
    for variable in load_dashboard().get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        if match := _LABEL_VALUES.match(text):
            promql = match["selector"]
        elif match := _QUERY_RESULT.match(text):
            promql = match["query"]
        else:
            raise ValueError(f"variable {variable['name']}: unsupported query {text!r}")
        expressions.append(Expression(f"variable ${variable['name']}", substitute_grafana_variables(promql)))
    return expressions


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES_PATH.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def rule_expressions() -> list[Expression]:
    return [
        Expression(f"alert {rule['alert']}" if "alert" in rule else f"record {rule['record']}", rule["expr"])
        for rule in load_rules()
    ]


# --------------------------------------------------------------------------------------------------
# A small PromQL reader: tokens, metric names, and the comparison-stripped operands of an expression
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    kind: str  # string, number, ident, op, open, close, comma, other
    text: str
    start: int
    end: int


_TOKEN = re.compile(
    r"""(?P<ws>\s+)|(?P<comment>\#[^\n]*)
    |(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?|0x[0-9a-fA-F]+)
    |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    |(?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>=@])
    |(?P<open>[({\[])|(?P<close>[)}\]])|(?P<comma>,)|(?P<other>.)""",
    re.X | re.S,
)

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
        "start",
        "end",
        "atan2",
    }
)
_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_COMPARISONS = frozenset({"==", "!=", ">=", "<=", ">", "<"})
_ABSENT_FUNCTIONS = frozenset({"absent", "absent_over_time"})


def tokenize(expr: str) -> list[Token]:
    tokens = []
    for match in _TOKEN.finditer(expr):
        kind = match.lastgroup
        assert kind is not None
        if kind in ("ws", "comment"):
            continue
        if kind == "other":
            raise ValueError(f"unexpected character {match.group()!r} at {match.start()} in {expr!r}")
        tokens.append(Token(kind, match.group(), match.start(), match.end()))
    return tokens


def _matching_close(tokens: list[Token], index: int) -> int:
    """Index of the token closing the bracket opened at ``index``."""
    depth = 0
    for position in range(index, len(tokens)):
        if tokens[position].kind == "open":
            depth += 1
        elif tokens[position].kind == "close":
            depth -= 1
            if depth == 0:
                return position
    raise ValueError(f"unbalanced brackets from {tokens[index].text!r} at {tokens[index].start}")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (bare names before ``{``/``[`` or alone)."""
    tokens = tokenize(expr)
    names: set[str] = set()
    skip_until = -1
    for index, token in enumerate(tokens):
        if index <= skip_until:
            continue
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token.kind == "open" and token.text in "{[":
            # label matchers and range/subquery durations hold no metric names
            skip_until = _matching_close(tokens, index)
        elif token.kind == "ident" and token.text in _LABEL_LIST_KEYWORDS:
            if following is not None and following.text == "(":
                skip_until = _matching_close(tokens, index + 1)  # by (label, ...) etc.
        elif token.kind == "ident" and token.text not in _KEYWORDS:
            if following is not None and following.text == "(":
                continue  # a function call
            if token.text in _AGGREGATIONS and following is not None and following.text in ("by", "without"):
                continue  # sum by (...) (...)
            names.add(token.text)
    return names


def _top_level_operators(tokens: list[Token], wanted: frozenset[str]) -> list[int]:
    """Indexes of the operators in ``wanted`` outside any bracket."""
    found = []
    depth = 0
    for index, token in enumerate(tokens):
        if token.kind == "open":
            depth += 1
        elif token.kind == "close":
            depth -= 1
        elif depth == 0 and token.text in wanted:
            found.append(index)
    return found


def _skip_modifiers(tokens: list[Token], index: int) -> int:
    """First token after a binary operator's ``bool``/``on(...)``/``group_left(...)`` modifiers."""
    while index < len(tokens) and tokens[index].text in (_LABEL_LIST_KEYWORDS | {"bool"}):
        if tokens[index].text != "bool" and index + 1 < len(tokens) and tokens[index + 1].text == "(":
            index = _matching_close(tokens, index + 1)
        index += 1
    return index


def _span(expr: str, tokens: list[Token]) -> str:
    return expr[tokens[0].start : tokens[-1].end]


def probe_expressions(expr: str) -> list[str]:
    """The parts of an alert expression that must return data from a healthy, running consumer.

    An alert expression is normally empty when all is well ("dead letters > 0"), so emptiness proves
    nothing about its series. This strips what filters: ``A > x`` probes ``A``; ``A and B`` and ``A or B``
    probe both sides; ``A unless B`` probes ``A`` (``B`` only excludes); ``absent(A)`` probes ``A``;
    surrounding parentheses are removed. Operators are split by PromQL precedence (``or`` lowest, then
    ``and``/``unless``, then comparisons; all left-associative).
    """
    tokens = tokenize(expr)
    if not tokens:
        raise ValueError("empty expression")
    for operators in (frozenset({"or"}), frozenset({"and", "unless"}), _COMPARISONS):
        positions = _top_level_operators(tokens, operators)
        if positions:
            split = positions[-1]  # left-associative: the last one binds loosest
            left = tokens[:split]
            right = tokens[_skip_modifiers(tokens, split + 1) :]
            probes = probe_expressions(_span(expr, left))
            if tokens[split].text in ("or", "and"):
                probes += probe_expressions(_span(expr, right))
            return probes
    if tokens[0].kind == "open" and tokens[0].text == "(" and _matching_close(tokens, 0) == len(tokens) - 1:
        return probe_expressions(_span(expr, tokens[1:-1]))
    if (
        tokens[0].text in _ABSENT_FUNCTIONS
        and len(tokens) > 1
        and tokens[1].text == "("
        and _matching_close(tokens, 1) == len(tokens) - 1
    ):
        return probe_expressions(_span(expr, tokens[2:-1]))
    return [_span(expr, tokens)]


def exported_metric_names() -> set[str]:
    """Every sample name the registry (the consumer's metrics and the default collectors) can expose."""
    names = set(STANDARD_METRICS)
    for family in REGISTRY.collect():
        for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


# --------------------------------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: run `make system-deps` (installs the Debian package `prometheus`)",
            pytrace=False,
        )
    return path


def run_promtool(*args: str, cwd: Path = OBSERVABILITY_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES_PATH))
    assert result.returncode == 0, f"promtool check rules failed:\n{result.stdout}\n{result.stderr}"
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout, result.stdout


def test_promtool_test_rules() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS_PATH))
    assert result.returncode == 0, f"promtool test rules failed:\n{result.stdout}\n{result.stderr}"


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard expression (as a recording rule) after variable substitution."""
    expressions = dashboard_expressions() + dashboard_variable_queries()
    rules = [{"record": f"dashboard:expression_{i}", "expr": e.promql} for i, e in enumerate(expressions)]
    rule_file = tmp_path / "dashboard-expressions.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(rule_file), cwd=tmp_path)
    failed = [
        f"{e.origin}: {e.promql}"
        for i, e in enumerate(expressions)
        if f'"dashboard:expression_{i}"' in result.stderr
    ]
    assert result.returncode == 0, (
        "dashboard expressions promtool cannot parse:\n"
        + "\n".join(failed or ["(see promtool output)"])
        + f"\n{result.stdout}\n{result.stderr}"
    )


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------


def test_every_referenced_metric_is_exported_by_the_consumer() -> None:
    exported = exported_metric_names()
    expressions = dashboard_expressions() + dashboard_variable_queries() + rule_expressions()
    unknown = [
        f"{e.origin}: {name}"
        for e in expressions
        for name in sorted(promql_metric_names(e.promql) - exported)
    ]
    assert not unknown, "metrics that consumer/metrics.py does not export:\n" + "\n".join(unknown)
    nameless = [e.origin for e in expressions if not promql_metric_names(e.promql)]
    assert not nameless, f"expressions that select no metric (or that the reader missed): {nameless}"


def test_exported_names_include_the_consumer_metrics_with_their_suffixes() -> None:
    exported = exported_metric_names()
    for name in (
        "cdc_embedder_events_total",
        "cdc_embedder_events_created",
        "cdc_embedder_end_to_end_seconds_bucket",
        "cdc_embedder_end_to_end_seconds_count",
        "cdc_embedder_consumer_lag_messages",
        "cdc_embedder_model_info",
        "process_resident_memory_bytes",
        "up",
    ):
        assert name in exported
    assert "cdc_embedder_events" not in exported  # a counter is only exposed with its suffixes
    assert "cdc_embedder_model" not in exported


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (outcome) (rate(cdc_embedder_events_total{job=~"a|b", outcome!="x"}[1m]))',
            {"cdc_embedder_events_total"},
        ),
        ("histogram_quantile(0.99, sum by (le, job) (rate(x_bucket[5m:30s] offset 1h)))", {"x_bucket"}),
        ("(time() - a) > 600 and on (job, instance) sum without (topic) (b) > 0", {"a", "b"}),
        ('up{job="x"} == 0 or absent(up{job="x"})', {"up"}),
        ("sum(rate(a[1m])) / ignoring (le) group_left (x) sum(c)", {"a", "c"}),
        ('label_replace(a, "dst", "$1", "src", "(.*)") * on() group_left() b', {"a", "b"}),
        (
            "topk(5, max by (instance) (process_resident_memory_bytes)) > bool 1e9",
            {"process_resident_memory_bytes"},
        ),
        ("sum(rate(cdc_embedder_nope_total[5m]))", {"cdc_embedder_nope_total"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_an_unexported_metric_is_reported() -> None:
    assert promql_metric_names("rate(cdc_embedder_nope_total[5m])") - exported_metric_names() == {
        "cdc_embedder_nope_total"
    }


@pytest.mark.parametrize(
    ("expr", "probes"),
    [
        ("a > 1", ["a"]),
        (
            "(time() - a) > 600 and on (job, instance) sum by (job, instance) (b) > 0",
            ["time() - a", "sum by (job, instance) (b)"],
        ),
        ('up{job="x"} == 0 or absent(up{job="x"})', ['up{job="x"}', 'up{job="x"}']),
        (
            "sum(increase(a[10m])) > 0 or sum(a unless a offset 10m) > 0",
            ["sum(increase(a[10m]))", "sum(a unless a offset 10m)"],
        ),
        ("a > 0 unless b", ["a"]),
        (
            "histogram_quantile(0.99, sum by (le) (rate(a[5m]))) > 30",
            ["histogram_quantile(0.99, sum by (le) (rate(a[5m])))"],
        ),
        ("(a > 1)", ["a"]),
        ("a - b > bool 1", ["a - b"]),
    ],
)
def test_probe_expressions(expr: str, probes: list[str]) -> None:
    assert probe_expressions(expr) == probes


def test_grafana_variables_are_substituted() -> None:
    assert (
        substitute_grafana_variables('rate(a{job=~"$job", instance=~"${instance:regex}"}[$__rate_interval])')
        == 'rate(a{job=~"cdc-embedder", instance=~".*"}[1m])'
    )
    with pytest.raises(ValueError, match="unknown Grafana variable"):
        substitute_grafana_variables('rate(a{x=~"$nope"}[1m])')


# --------------------------------------------------------------------------------------------------
# The rules and their tests
# --------------------------------------------------------------------------------------------------


def test_required_alerts_have_severity_summary_description_and_runbook() -> None:
    rules = {rule["alert"]: rule for rule in load_rules() if "alert" in rule}
    assert set(rules) >= REQUIRED_ALERTS, f"missing alerts: {sorted(REQUIRED_ALERTS - set(rules))}"
    for name, rule in rules.items():
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity label"
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert str(annotations.get(key, "")).strip(), f"{name}: missing annotation {key}"


def test_no_progress_alert_uses_last_batch_timestamp_and_lag() -> None:
    rules = {rule["alert"]: rule for rule in load_rules() if "alert" in rule}
    names = promql_metric_names(rules["CdcEmbedderNoProgress"]["expr"])
    assert {"cdc_embedder_last_batch_timestamp_seconds", "cdc_embedder_consumer_lag_messages"} <= names
    assert "cdc_embedder_end_to_end_seconds_bucket" in promql_metric_names(
        rules["CdcEmbedderFreshnessHigh"]["expr"]
    )


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    document = yaml.safe_load(RULE_TESTS_PATH.read_text())
    assert [OBSERVABILITY_DIR / f for f in document["rule_files"]] == [RULES_PATH]
    fires: set[str] = set()
    stays_quiet: set[str] = set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else stays_quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in load_rules() if "alert" in rule}
    assert alerts - fires == set(), "alerts with no firing test case"
    assert alerts - stays_quiet == set(), "alerts with no non-firing test case"


# --------------------------------------------------------------------------------------------------
# The dashboard
# --------------------------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard_panels(dashboard)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), f"panel {panel['id']}: gridPos"
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, (
            f"panel {panel['id']}: wider than the grid"
        )
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['id']} {panel.get('title')!r} has no query"
        for source in [panel["datasource"], *(target["datasource"] for target in panel["targets"])]:
            assert source == {"type": "prometheus", "uid": DATASOURCE_VARIABLE}, f"panel {panel['id']}"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), (
                f"panel {panel['id']} target {target.get('refId')}: no expr"
            )


def test_dashboard_charts_what_the_issue_asks_for() -> None:
    used = set().union(*(promql_metric_names(e.promql) for e in dashboard_expressions()))
    missing = DASHBOARD_REQUIRED_METRICS - used
    assert not missing, f"dashboard does not chart: {sorted(missing)}"
    quantiles = {
        float(q)
        for e in dashboard_expressions()
        if "cdc_embedder_end_to_end_seconds_bucket" in e.promql
        for q in re.findall(r"histogram_quantile\(\s*([0-9.]+)", e.promql)
    }
    assert {0.5, 0.95, 0.99} <= quantiles, f"end-to-end quantiles charted: {sorted(quantiles)}"
