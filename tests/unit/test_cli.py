"""consumer.cli: the argument parser, and main()'s exit codes and messages."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from consumer import cli
from consumer.embedders.base import ModelLoadError
from consumer.settings import Settings


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


DOCUMENTED = [
    "run",
    "stack",
    "connector",
    "search",
    "replay-dlq",
    "backfill",
    "migrate",
    "audit",
    "demo",
    "bench",
    "openvino-export",
]


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(action.choices)


def test_the_documented_commands_exist_and_dispatch(parser: argparse.ArgumentParser) -> None:
    assert subcommands(parser) == DOCUMENTED
    assert list(cli.COMMANDS) == DOCUMENTED


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run"], {"command": "run"}),
        (["audit"], {"command": "audit", "repair": False, "sample": 10}),
        (["audit", "--repair", "--sample", "3"], {"command": "audit", "repair": True, "sample": 3}),
        (["stack", "up"], {"command": "stack", "action": "up", "purge": False}),
        (["stack", "down", "--purge"], {"command": "stack", "action": "down", "purge": True}),
        (["stack", "status"], {"command": "stack", "action": "status"}),
        (["connector", "register"], {"command": "connector", "action": "register", "file": None}),
        (
            ["connector", "register", "--file", "connectors/documents.json"],
            {"action": "register", "file": Path("connectors/documents.json")},
        ),
        (["connector", "delete"], {"action": "delete"}),
        (["connector", "status"], {"action": "status"}),
        (["search", "vector databases"], {"command": "search", "query": "vector databases", "k": 5}),
        (["search", "q", "-k", "12"], {"query": "q", "k": 12}),
        (
            ["replay-dlq"],
            {"command": "replay-dlq", "error_class": None, "since": None, "until": None},
        ),
        (["backfill"], {"command": "backfill", "where": None, "dry_run": False, "no_follow": False}),
        (["backfill", "--where", "id > 5", "--dry-run"], {"where": "id > 5", "dry_run": True}),
        (
            [
                "replay-dlq",
                "--error-class",
                "model_error",
                "--since",
                "2024-06-01T00:00:00+00:00",
                "--until",
                "2024-06-02T00:00:00+00:00",
            ],
            {
                "error_class": "model_error",
                "since": "2024-06-01T00:00:00+00:00",
                "until": "2024-06-02T00:00:00+00:00",
            },
        ),
        (["backfill", "tickets"], {"pipeline": "tickets", "where": None}),
        (["search", "q", "--pipeline", "tickets"], {"pipeline": "tickets"}),
        (["replay-dlq", "--pipeline", "tickets"], {"pipeline": "tickets", "error_class": None}),
        (
            ["migrate", "switch", "public.search", "--to", "v2"],
            {"command": "migrate", "action": "switch", "view": "public.search", "to": "v2", "force": False},
        ),
        (["migrate", "status", "public.search"], {"action": "status", "sample_s": 5.0}),
        (["demo"], {"command": "demo", "file": None}),
        (["demo", "--file", "rows.jsonl"], {"command": "demo", "file": Path("rows.jsonl")}),
    ],
)
def test_parser_accepts(
    parser: argparse.ArgumentParser, argv: list[str], expected: dict[str, object]
) -> None:
    args = vars(parser.parse_args(argv))
    assert {k: args[k] for k in expected} == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["launch"],
        ["stack"],
        ["stack", "sideways"],
        ["connector", "restart"],
        ["search"],
        ["search", "q", "-k", "many"],
        ["run", "--unknown"],
    ],
)
def test_parser_rejects(
    parser: argparse.ArgumentParser, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2
    assert "usage: cdc-embedder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["run"], {"CDC_BATCH_MAX_EVENTS": "lots"}, ["CDC_BATCH_MAX_EVENTS"]),
        (["stack", "status"], {"CDC_HTTP_PORT": "-1"}, ["CDC_HTTP_PORT"]),
        (["search", "q"], {"CDC_SOURCE_TABLE": "a.b.c"}, ["CDC_SOURCE_TABLE"]),
        (
            ["replay-dlq"],
            {"CDC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
            ["CDC_KAFKA_SASL_MECHANISM", "CDC_KAFKA_SASL_USERNAME", "CDC_KAFKA_SASL_PASSWORD"],
        ),
    ],
)
def test_main_with_a_bad_setting_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    named: list[str],
) -> None:
    called: list[str] = []

    def recorder(command: str) -> Callable[[Settings, argparse.Namespace], int]:
        def record(settings: Settings, args: argparse.Namespace) -> int:
            called.append(command)
            return 0

        return record

    for command in cli.COMMANDS:
        monkeypatch.setitem(cli.COMMANDS, command, recorder(command))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdc-embedder: invalid configuration: ")
    for variable in named:
        assert variable in err
    assert called == []


def test_main_dispatches_with_the_loaded_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Settings, argparse.Namespace]] = []

    def fake(settings: Settings, args: argparse.Namespace) -> int:
        seen.append((settings, args))
        return 7

    monkeypatch.setitem(cli.COMMANDS, "search", fake)
    monkeypatch.setenv("CDC_BATCH_MAX_EVENTS", "9")
    assert cli.main(["search", "hello", "-k", "3"]) == 7
    [(settings, args)] = seen
    assert settings.batch_max_events == 9
    assert (args.query, args.k) == ("hello", 3)


def test_main_expected_errors_exit_1_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(settings: Settings, args: argparse.Namespace) -> int:
        raise ModelLoadError("cannot load model 'x': set CDC_MODEL.")

    monkeypatch.setitem(cli.COMMANDS, "run", fail)
    assert cli.main(["run"]) == 1
    assert capsys.readouterr().err == "cdc-embedder: cannot load model 'x': set CDC_MODEL.\n"


def test_main_unexpected_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(settings: Settings, args: argparse.Namespace) -> int:
        raise ZeroDivisionError("bug")

    monkeypatch.setitem(cli.COMMANDS, "run", fail)
    with pytest.raises(ZeroDivisionError):
        cli.main(["run"])


def test_main_interrupted_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(settings: Settings, args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "demo", interrupted)
    assert cli.main(["demo"]) == 130


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (None, None),
        ("", None),
        ("2024-06-01T00:00:00+00:00", 1_717_200_000_000),
        ("2024-06-01T02:00:00+02:00", 1_717_200_000_000),
        ("2024-06-01T00:00:00.250Z", 1_717_200_000_250),
    ],
)
def test_replay_time_bounds(value: str | None, ms: int | None) -> None:
    assert cli._ms(value) == ms


@pytest.mark.parametrize(
    ("argv", "changed"),
    [
        (["bench"], {}),
        (["bench", "--soak", "30"], {"soak_minutes": 30.0}),
        (
            ["bench", "--n", "50", "--latency-n", "7", "--keep-stack", "--out", "r"],
            {"n": 50, "latency_n": 7, "keep_stack": True, "out": Path("r")},
        ),
        (["bench", "--ab-load", "0.75", "--ab-rounds", "3"], {"ab_load": 0.75, "ab_rounds": 3}),
    ],
)
def test_bench_options_reach_bench_args_and_the_rest_keep_its_defaults(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], changed: dict[str, object]
) -> None:
    from dataclasses import replace

    from consumer.bench import runner

    seen: list[runner.BenchArgs] = []
    monkeypatch.setattr(runner, "run_bench", lambda bench, _say: seen.append(bench) or 0)
    assert cli.main(argv) == 0
    assert seen == [replace(runner.BenchArgs(), **changed)]
