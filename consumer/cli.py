"""`cdc-embedder`: run the consumer, manage the local stack and the connector, search, replay, backfill,
audit, demo, export a model to OpenVINO."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import datetime
from pathlib import Path

import psycopg

from consumer.errors import OperatorError
from consumer.settings import Settings, SettingsError, env_name, load_settings


def say(message: str) -> None:
    print(message, flush=True)


def _cmd_run(settings: Settings, _: argparse.Namespace) -> int:
    from consumer.logs import configure_logging
    from consumer.service import run_service

    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(run_service(settings))


def _cmd_stack(settings: Settings, args: argparse.Namespace) -> int:
    from consumer.stack import LocalStack

    stack = LocalStack(settings)
    if args.action == "up":
        stack.up(progress=say)
    elif args.action == "down":
        stack.down(purge=args.purge, progress=say)
    else:
        for component, state in stack.status().items():
            say(f"{component:10} " + "  ".join(f"{k}={v}" for k, v in state.items()))
    return 0


def _cmd_connector(settings: Settings, args: argparse.Namespace) -> int:
    from consumer import connectors

    if args.action == "register":
        asyncio.run(_cover_tables(settings, args.file))
        name = connectors.register_connector(settings, args.file, progress=say)
        say(f"connector {name} is RUNNING on {settings.connect_rest_url}")
    elif args.action == "delete":
        deleted = connectors.delete_connector(settings, path=args.file)
        say("connector deleted" if deleted else "no such connector")
    else:
        say(str(connectors.connector_status(settings, path=args.file)))
    return 0


async def _cover_tables(settings: Settings, path: Path | None) -> None:
    """The publication must hold every table the connector captures, or it captures nothing of it."""
    from consumer import connectors
    from consumer.schema import ensure_publication

    config = connectors.connector_config(settings, path)["config"]
    tables = config["table.include.list"].split(",")
    if signal := config.get("signal.data.collection"):
        tables.append(signal)
    async with await psycopg.AsyncConnection.connect(settings.dsn) as conn:
        added = await ensure_publication(conn, config["publication.name"], tables)
    for table in added:
        say(f"publication {config['publication.name']}: added {table}")


def _cmd_search(settings: Settings, args: argparse.Namespace) -> int:
    from consumer.demo import print_search
    from consumer.embedders import build_embedder
    from consumer.spec import pipeline_settings

    settings = pipeline_settings(settings, args.pipeline)
    asyncio.run(print_search(settings, build_embedder(settings), args.query, args.k, say))
    return 0


def _cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from consumer.dlq import ReplayFilter, replay_dead_letters

    keep = ReplayFilter(args.error_class, args.pipeline, _ms(args.since), _ms(args.until))
    result = asyncio.run(replay_dead_letters(settings, keep, say))
    say(
        f"replayed {result.replayed} of {result.scanned} dead letters from {settings.dlq_topic} "
        "to the topics they came from"
    )
    return 0


def _cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from consumer.databases import connect_both
    from consumer.ops.backfill import follow_backfill, plan_backfill, request_backfill, source_end_offsets
    from consumer.spec import pipeline_settings

    settings = pipeline_settings(settings, args.pipeline)

    async def backfill() -> int:
        async with connect_both(settings) as dbs:
            plan = await plan_backfill(dbs, settings, args.where)
            say(("would snapshot " if args.dry_run else "snapshotting ") + plan.describe(settings))
            if args.dry_run or not plan.rows:
                return 0
            start = await source_end_offsets(settings)
            signal = await request_backfill(dbs.source, settings, args.where)
        say(f"asked Debezium for an incremental snapshot (signal {signal}); live changes keep flowing")
        if args.no_follow:
            return 0
        seen = await follow_backfill(settings, start, plan.rows)
        say(f"{seen} of {plan.rows} snapshot rows reached {settings.source_topic}; the consumer embeds them")
        return 0 if seen >= plan.rows else 1

    return asyncio.run(backfill())


def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from consumer.ops import migrate

    if settings.separate_vector_database:
        raise migrate.MigrateError(
            "migrate counts each pipeline's progress by joining the source table with its vector table, so "
            "it needs them in one database: unset CDC_VECTOR_DATABASE_URL for it (not supported yet)"
        )

    async def run() -> int:
        async with await psycopg.AsyncConnection.connect(settings.dsn) as conn:
            if args.action == "status":
                before = await migrate.progress(conn, settings, args.view)
                await asyncio.sleep(args.sample_s)  # two samples: a rate for the ETA
                after = await migrate.progress(conn, settings, args.view)
                for was, now in zip(before, after, strict=True):
                    say(now.describe(was, args.sample_s))
            elif args.action == "switch":
                if args.to is None:
                    raise migrate.MigrateError("switch needs --to PIPELINE")
                served = await migrate.switch(conn, settings, args.view, args.to, args.force)
                say(f"{args.view} now reads {args.to} (it read {served})")
            elif args.action == "rollback":
                say(f"{args.view} reads {await migrate.rollback(conn, settings, args.view)} again")
            else:
                dropped = await migrate.retire(conn, settings, args.view)
                say(f"dropped {dropped}, which {args.view} read before")
        return 0

    return asyncio.run(run())


def _cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from consumer.databases import connect_both
    from consumer.ops.audit import audit_pipeline
    from consumer.ops.repair import repair
    from consumer.spec import pipeline_settings

    settings = pipeline_settings(settings, args.pipeline)

    async def audit() -> int:
        async with connect_both(settings, autocommit=True) as dbs:
            cur = await dbs.source.execute(
                "SELECT nullif(greatest(reltuples, 0), 0)::bigint FROM pg_class WHERE oid = to_regclass(%s)",
                (settings.source_table,),
            )
            estimate = await cur.fetchone()  # an estimate: counting would read the whole table
            with tqdm(
                total=estimate[0] if estimate else None, unit="rows", desc="source rows audited"
            ) as bar:
                target, report = await audit_pipeline(dbs, settings, bar.update)
            for line in report.describe(args.sample):
                say(line)
            if not report.findings:
                return 0
            if not args.repair:
                return DRIFT_EXIT
            say((await repair(dbs, settings, target, report)).describe())
            return 0

    return asyncio.run(audit())


def _cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from consumer.demo import run_demo

    return asyncio.run(run_demo(settings, args.file, say))


def _cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from consumer.bench.runner import BenchArgs, run_bench

    # Options left out keep BenchArgs' defaults, the one place they are written.
    given = {f.name: getattr(args, f.name) for f in fields(BenchArgs) if hasattr(args, f.name)}
    return run_bench(BenchArgs(**given), say)


def _cmd_openvino_export(settings: Settings, args: argparse.Namespace) -> int:
    from consumer.embedders.openvino_export import cache_folder, calibration_texts, export, read_meta
    from consumer.spec import pipeline_settings

    settings = pipeline_settings(settings, args.pipeline)
    quantization = args.quantization or settings.embed_quantization
    settings = settings.model_copy(update={"embed_runtime": "openvino", "embed_quantization": quantization})
    folder = cache_folder(settings)
    if read_meta(folder) is not None and not args.force:
        say(f"{settings.model_identity} is exported already in {folder} (--force exports it again)")
        return 0
    texts: list[str] = []
    if quantization == "int8":
        if args.calibration is None:
            raise SettingsError("an int8 export needs --calibration FILE: texts like the ones to embed")
        texts = calibration_texts(args.calibration, args.calibration_n)
        say(f"calibrating on {len(texts)} texts of {args.calibration} ...")
    say(f"exporting {settings.model} to OpenVINO IR ({'int8' if texts else 'lossless'}) ...")
    report = export(settings, texts)
    quantized = f", quantized in {report['quantize_s']:.1f} s" if "quantize_s" in report else ""
    say(
        f"exported {settings.model} in {report['convert_s']:.1f} s{quantized}: "
        f"{report['bytes'] / 2**20:.0f} MB in {folder}; {env_name('embed_runtime')}=openvino"
        + (f" {env_name('embed_quantization')}=int8" if texts else "")
        + f" embeds with it, as {settings.model_identity}"
    )
    return 0


DRIFT_EXIT = 3  # `audit` found drift and was not asked to repair it


def _ms(value: str | None) -> int | None:
    return int(datetime.fromisoformat(value).timestamp() * 1000) if value else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdc-embedder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="consume change events and keep the vector table in sync")
    stack = commands.add_parser("stack", help="the local Postgres + Kafka + Kafka Connect, without Docker")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.add_argument("--purge", action="store_true", help="with down: delete all state but the jars")
    connector = commands.add_parser("connector", help="the Debezium connector, through Connect's REST API")
    connector.add_argument("action", choices=["register", "delete", "status"])
    connector.add_argument(
        "--file", type=Path, default=None, help="connector JSON (connectors/documents.json)"
    )
    search = commands.add_parser("search", help="embed a query and print the nearest rows")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--pipeline", default=None, help="whose vectors (needed when there are several)")
    replay = commands.add_parser("replay-dlq", help="re-publish dead-lettered records to the source topic")
    replay.add_argument("--error-class", default=None, help="only records of this class (e.g. model_error)")
    replay.add_argument("--pipeline", default=None, help="only records this pipeline failed")
    replay.add_argument("--since", default=None, help="first failed at or after (ISO 8601)")
    replay.add_argument("--until", default=None, help="first failed at or before (ISO 8601)")
    backfill = commands.add_parser(
        "backfill", help="snapshot rows through Debezium (incremental) so that they get vectors"
    )
    backfill.add_argument("pipeline", nargs="?", default=None, help="which (needed when there are several)")
    backfill.add_argument("--where", default=None, help="SQL condition on the source table (default: all)")
    backfill.add_argument("--dry-run", action="store_true", help="say how many rows and tokens; do nothing")
    backfill.add_argument("--no-follow", action="store_true", help="ask for the snapshot and return")
    migrate = commands.add_parser("migrate", help="move a search view to another model without a gap")
    migrate.add_argument("action", choices=["status", "switch", "rollback", "retire"])
    migrate.add_argument("view", help="the search_view of the pipelines (schema.view)")
    migrate.add_argument("--to", default=None, help="with switch: the pipeline the view is to read")
    migrate.add_argument("--force", action="store_true", help="with switch: even if vectors are missing")
    migrate.add_argument("--sample-s", type=float, default=5.0, help="with status: seconds between samples")
    audit = commands.add_parser(
        "audit", help="compare the source table with the vector table; --repair fixes the drift found"
    )
    audit.add_argument("pipeline", nargs="?", default=None, help="which (needed when there are several)")
    audit.add_argument("--repair", action="store_true", help="snapshot missing/stale keys, tombstone orphans")
    audit.add_argument("--sample", type=int, default=10, help="keys shown per kind of drift")
    demo = commands.add_parser("demo", help="stack up, connector, sample rows, consumer, then a search")
    demo.add_argument("--file", type=Path, default=None, help="JSONL of {id, title, body} rows to load")
    bench = commands.add_parser(
        "bench",
        help="measure model, hardware bound and pipeline; write a report",
        argument_default=argparse.SUPPRESS,  # defaults live in consumer.bench.runner.BenchArgs
    )
    bench.add_argument("--n", type=int, help="texts for the raw model and the bulk insert")
    bench.add_argument("--variant-n", type=int, help="texts per raw-model variant and round")
    bench.add_argument("--rounds", type=int, help="interleaved rounds of the variants (best kept)")
    bench.add_argument("--freshness-s", type=float, help="steady-load duration")
    bench.add_argument(
        "--ab-rounds", type=int, help="rounds of the freshness A/B of consumer policies (0: skip)"
    )
    bench.add_argument("--ab-seconds", type=float, help="steady load per A/B policy and round")
    bench.add_argument(
        "--ab-load",
        type=float,
        help="the A/B's load, a share of the bulk rate (0.5: half load, as the freshness)",
    )
    bench.add_argument(
        "--write-ab-rounds", type=int, help="rounds of the bulk A/B of a batch written in parts (0: skip)"
    )
    bench.add_argument("--write-ab-n", type=int, help="rows per bulk load of that A/B")
    bench.add_argument("--chunked-n", type=int, help="longest corpus texts embedded as chunks (0: skip)")
    bench.add_argument("--latency-n", type=int, help="single-row inserts per insert-latency condition")
    bench.add_argument("--latency-rounds", type=int, help="stopped/running rounds the inserts alternate in")
    bench.add_argument("--soak", dest="soak_minutes", type=float, metavar="MINUTES", help="steady load")
    bench.add_argument("--remote-n", type=int, help="texts for the remote path (openai backend); 0 skips it")
    bench.add_argument("--runtime-n", type=int, help="texts per runtime (torch, OpenVINO) and round; 0 skips")
    bench.add_argument("--calibration-n", type=int, help="corpus texts the bench's int8 models calibrate on")
    bench.add_argument(
        "--runtimes-only", action="store_true", help="only torch vs OpenVINO speed and quality; no stack"
    )
    bench.add_argument("--out", type=Path, help="reports go to OUT/<time>/")
    bench.add_argument("--keep-stack", action="store_true", help="leave the bench stack (.stack-bench) up")
    export = commands.add_parser(
        "openvino-export",
        help="export CDC_MODEL to OpenVINO IR in CDC_OPENVINO_CACHE_DIR, lossless or int8 (calibrated)",
    )
    export.add_argument(
        "--quantization", choices=["none", "int8"], default=None, help="default: CDC_EMBED_QUANTIZATION"
    )
    export.add_argument("--calibration", type=Path, default=None, help="int8: texts, a line each, or JSONL")
    export.add_argument("--calibration-n", type=int, default=300, help="int8: the first N texts of the file")
    export.add_argument("--force", action="store_true", help="export again over an existing export")
    export.add_argument("--pipeline", default=None, help="whose model (needed when there are several)")
    return parser


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "run": _cmd_run,
    "stack": _cmd_stack,
    "connector": _cmd_connector,
    "search": _cmd_search,
    "replay-dlq": _cmd_replay,
    "backfill": _cmd_backfill,
    "migrate": _cmd_migrate,
    "audit": _cmd_audit,
    "demo": _cmd_demo,
    "bench": _cmd_bench,
    "openvino-export": _cmd_openvino_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        return COMMANDS[args.command](settings, args)
    except SettingsError as exc:
        print(f"cdc-embedder: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OperatorError as exc:
        print(f"cdc-embedder: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(
            f"cdc-embedder: Postgres not reachable ({exc}): set {env_name('database_url')}", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
