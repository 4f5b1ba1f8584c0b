"""`cdc-embedder bench`: model, hardware bound and the real pipeline, measured in one run, one report."""

from __future__ import annotations

import gc
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

import psycopg

from consumer.bench import model as bm
from consumer.bench.ab import freshness_ab, write_parts_ab
from consumer.bench.chunked import chunked_throughput, longest_rows
from consumer.bench.cpu_time import CONSUMER, CpuMeter
from consumer.bench.cpus import split
from consumer.bench.flops import GTE_SMALL, histogram_quantile, slope, summary
from consumer.bench.insert_cost import alternating, ratios, separate_cores, vectors_apart
from consumer.bench.machine import RssSampler, machine
from consumer.bench.phases import bulk_throughput, cycle_rows, insert_latencies, steady_load, wait_embedded
from consumer.bench.pipeline import bench_env, create_source_table, histogram_buckets
from consumer.bench.profile import PySpy
from consumer.bench.remote import remote_path
from consumer.bench.report import write_report
from consumer.consumer_process import ConsumerProcess, Samples
from consumer.embedders.local import SentenceTransformerEmbedder
from consumer.settings import Settings

Say = Callable[[str], None]
# id ranges of the phases, apart from each other
LATENCY_IDS, BULK_IDS, STEADY_IDS, SOAK_IDS, REMOTE_IDS, CHUNKED_IDS, AB_IDS, WRITE_AB_IDS = (
    1_000_000,
    10_000_000,
    20_000_000,
    30_000_000,
    40_000_000,
    50_000_000,
    60_000_000,
    70_000_000,
)
PROFILED_N = 500  # rows of the bulk load py-spy samples
# (name, dtype, token budget, torch threads); 0 threads: the settings' value
VARIANTS = (
    ("fp32, one padded batch (before)", "float32", 0, 0),
    ("fp32, token budget 1024", "float32", 1024, 0),
    ("fp32, token budget 512", "float32", 512, 0),
    ("fp32, token budget 1024, 1 thread", "float32", 1024, 1),
    ("bf16, one padded batch", "bfloat16", 0, 0),
    ("bf16, token budget 1024", "bfloat16", 1024, 0),
    ("bf16, token budget 512", "bfloat16", 512, 0),
)


@dataclass(frozen=True)
class BenchArgs:
    n: int = 2000
    variant_n: int = 200
    rounds: int = 3
    freshness_s: float = 120.0
    ab_rounds: int = 2  # rounds of the freshness A/B (consumer policies alternated); 0: skip it
    ab_seconds: float = 40.0  # steady load per policy and round
    ab_load: float = 0.5  # the A/B's load as a share of the bulk rate: half load, or nearer saturation
    write_ab_rounds: int = 3  # rounds of the bulk A/B of a batch written at once or in parts; 0: skip it
    write_ab_n: int = 1000  # rows per bulk load of that A/B
    latency_n: int = 500  # per condition; a p99 from 200 samples is its 2nd-largest: one outlier moved it 50%
    latency_pace_s: float = 0.1
    latency_rounds: int = 5
    soak_minutes: float = 0.0
    remote_n: int = 1000  # texts for the remote path (openai backend against infinity-emb); 0: skip it
    chunked_n: int = 20  # the corpus's longest texts, embedded as chunks (CDC_CHUNKING=chunk); 0: skip it
    runtime_n: int = 500  # texts per runtime (torch, OpenVINO lossless and int8) and round; 0: skip them
    calibration_n: int = 300  # corpus texts the int8 model is calibrated on
    runtimes_only: bool = False  # only the runtimes phase: no stack, no pipeline
    out: Path = Path("bench-results")
    corpus: Path = bm.CORPUS
    keep_stack: bool = False


def run_bench(args: BenchArgs, say: Say) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no load reports between progress lines
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    started = datetime.now()
    folder = args.out / started.strftime("%Y%m%d-%H%M%S")
    # (named apart from the folders of earlier versions, in a layout infinity-emb could not load)
    model_folder = bm.build_random_model((args.out / "cache" / "gte-small-shaped-random").resolve())
    env = bench_env(model_folder)
    settings = Settings.from_env_map(env)
    result: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "args": {k: str(v) for k, v in asdict(args).items()},
        "machine": machine(),
        "settings": {k: str(v) for k, v in settings.model_dump(mode="json").items()},
    }
    result["settings"]["database_url"] = settings.redacted_dsn()
    say(f"machine: {result['machine']}")
    say(f"results: {folder}")
    if args.runtimes_only:
        result["scope"] = "runtimes"
        result["runtimes"] = runtimes(args, settings, say)
        return _finish(result, folder, say)
    if args.soak_minutes <= 0:
        model_phases(args, settings, result, say)
        if args.runtime_n > 0:
            result["runtimes"] = runtimes(args, settings, say)
            for mode in result["runtimes"]["modes"].values():
                mode["bf16_fraction_of_bound"] = mode["gflops"] / result["matmul"]["bfloat16"]["gflops"]
    try:
        pipeline_phases(args, env, settings, result, say)
    finally:
        folder.mkdir(parents=True, exist_ok=True)
        for log in (settings.stack_dir / "logs").glob("bench-consumer*"):  # per-batch timings, profile
            shutil.copy(log, folder)
        if not args.keep_stack:
            from consumer.stack import LocalStack

            LocalStack(settings).down(purge=True, progress=say)
        for path in write_report(result, folder):
            say(f"wrote {path}")
    return _finish(result, None, say)


def _finish(result: dict[str, Any], folder: Path | None, say: Say) -> int:
    """Write the report (unless written) and say each target's verdict."""
    if folder is not None:
        for path in write_report(result, folder):
            say(f"wrote {path}")
    for t in result["targets"]:
        say(
            f"{'PASS' if t['pass'] else 'FAIL'} {t['name']}: {t['value']:.3g} (target {t['op']} {t['limit']})"
        )
    return 0


def runtimes(args: BenchArgs, settings: Settings, say: Say) -> dict[str, Any]:
    from consumer.bench.runtimes import runtimes_phase

    cache = (args.out / "cache" / "openvino").resolve()
    return runtimes_phase(
        args.corpus, settings, cache, args.runtime_n or 500, args.rounds, args.calibration_n, say
    )


def model_phases(args: BenchArgs, settings: Settings, result: dict[str, Any], say: Say) -> None:
    """torch's variants against the matmul bounds (OpenVINO's figures are the runtimes phase's)."""
    import torch

    settings = settings.model_copy(update={"embed_runtime": "torch"})
    say("matmul bound: fp32, bf16 ...")
    matmul = {d: bm.matmul_bound(d) for d in ("float32", "bfloat16")}
    say(f"  fp32 {matmul['float32']['gflops']:.0f} GFLOP/s, bf16 {matmul['bfloat16']['gflops']:.0f} GFLOP/s")
    rows = bm.corpus_rows(args.corpus, args.n)
    texts = bm.texts_of(rows, settings)
    configured = SentenceTransformerEmbedder(settings)
    dtype_in_use = configured.dtype
    say(f"raw model on torch: {args.n} texts (dtype {settings.embed_dtype}: {dtype_in_use}) ...")
    reference = bm.encode_run(configured, texts, settings.batch_max_events, GTE_SMALL)
    say(f"  {reference['texts_per_s']:.1f} texts/s, {reference['tokens_per_s']:.0f} tokens/s")
    threads = torch.get_num_threads()
    subset = texts[: args.variant_n]
    embedders = {
        name: SentenceTransformerEmbedder(
            settings.model_copy(
                update={"embed_dtype": dtype, "torch_threads": 0, "embed_token_budget": budget}
            )
        )
        for name, dtype, budget, _ in VARIANTS
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in embedders}
    for round_ in range(1, args.rounds + 1):  # interleaved, so a noisy neighbour hits every variant alike
        for name, _, _, n_threads in VARIANTS:
            torch.set_num_threads(n_threads or threads)
            say(f"raw model variant, round {round_}/{args.rounds}: {name} ({len(subset)} texts) ...")
            run = bm.encode_run(embedders[name], subset, settings.batch_max_events, GTE_SMALL)
            runs[name].append(run)
            say(f"  {run['texts_per_s']:.1f} texts/s, {run['achieved_gflops']:.0f} GFLOP/s")
    torch.set_num_threads(threads)
    del embedders
    gc.collect()
    variants = {name: max(r, key=lambda run: run["texts_per_s"]) for name, r in runs.items()}
    for (name, dtype, _, _), v in zip(VARIANTS, variants.values(), strict=True):
        v["dtype_bf16"] = float(dtype == "bfloat16")
        v["rounds"] = float(len(runs[name]))
    again = {d: bm.matmul_bound(d) for d in ("float32", "bfloat16")}  # the machine is shared: best of two
    for dtype in matmul:
        matmul[dtype]["gflops"] = max(matmul[dtype]["gflops"], again[dtype]["gflops"])
    baseline = variants[VARIANTS[0][0]]["texts_per_s"]
    for v in variants.values():
        bound = matmul["bfloat16" if v.pop("dtype_bf16") else "float32"]["gflops"]
        v["fraction_of_bound"] = v["achieved_gflops"] / bound
        v["speedup"] = v["texts_per_s"] / baseline
    ref_bound = matmul[dtype_in_use]["gflops"]
    reference["fraction_of_bound"] = reference["achieved_gflops"] / ref_bound
    variants = {f"as configured ({dtype_in_use}, default budget), all N": reference, **variants}
    fp32 = reference if dtype_in_use == "float32" else variants["fp32, token budget 1024"]
    bf16 = reference if dtype_in_use == "bfloat16" else variants["bf16, token budget 1024"]
    result["matmul"] = matmul
    result["raw"] = {
        "model": str(settings.model), "shape": GTE_SMALL.as_dict(), "texts_per_s": reference["texts_per_s"],
        "tokens_per_s": reference["tokens_per_s"], "fp32_fraction_of_bound": fp32["fraction_of_bound"],
        "bf16_fraction_of_bound": bf16["fraction_of_bound"],
        "default": "as configured", "variants": variants,
    }  # fmt: skip
    say("bf16 quality gate on the stand-in model ...")
    docs = bm.texts_of(bm.corpus_rows(args.corpus, 300, skip=20_000), settings)
    queries = [r["body"].split(".")[0][:120] for r in bm.corpus_rows(args.corpus, 20, skip=20_000)]
    result["quality_gate"] = bm.quality_gate(settings, docs, queries, settings.batch_max_events)
    say(f"  {'PASS' if result['quality_gate'].get('pass') else 'FAIL'}: {result['quality_gate']}")
    gc.collect()


def end_to_end(
    conn: psycopg.Connection[Any],
    settings: Settings,
    rows: list[dict[str, Any]],
    beside: bool,
    processes: Mapping[str, Iterable[int]],
    say: Say,
) -> dict[str, float]:
    """Bulk throughput of the pipeline; with `beside`, its ratio to the raw model on the same texts.

    The raw model runs in this process right before and right after the bulk load (the stack and the
    consumer idle), and the ratio is to the mean of the two: on a shared host whose speed drifts by a
    third between runs, only a measurement beside the pipeline's compares like with like. The CPU of
    `processes` (named trees, the consumer among them) over the load gives the ratio's ceiling here.
    """
    texts = bm.texts_of(rows, settings)
    embedder = bm.local_embedder(settings) if beside else None

    def raw_model(when: str) -> list[float]:
        if embedder is None:
            return []
        say(f"raw model {when} the pipeline's run, same {len(texts)} texts, in this process ...")
        rate = bm.encode_run(embedder, texts, settings.batch_max_events, GTE_SMALL)["texts_per_s"]
        say(f"  {rate:.1f} texts/s")
        return [rate]

    raw = raw_model("before")
    say(f"end to end: COPY {len(rows)} rows, waiting for the last vector ...")
    meter = CpuMeter(processes).start()
    bulk = bulk_throughput(conn, settings, rows, say)
    bulk |= meter.stop()
    used = ", ".join(
        f"{key.removeprefix('cpu_share_').replace('_', ' ')} {share:.0%}"
        for key, share in bulk.items()
        if key.startswith("cpu_share_")
    )
    say(f"  CPU over the load, share of the cores x wall time: {used}; what the others leave caps the "
        f"ratio to the raw model at {bulk['ceiling_to_raw']:.2f}")  # fmt: skip
    raw += raw_model("after")
    embedder = None  # its memory back before the load phases
    gc.collect()
    bulk["raw_beside_texts_per_s"] = sum(raw) / len(raw) if raw else math.nan
    bulk["ratio_to_raw"] = bulk["texts_per_s"] / bulk["raw_beside_texts_per_s"]
    say(f"  end to end {bulk['texts_per_s']:.1f} texts/s, {bulk['ratio_to_raw']:.2f} of the raw model beside")
    return bulk


def profiled_bulk(
    conn: psycopg.Connection[Any], settings: Settings, pid: int, corpus: Path, skip: int, say: Say
) -> dict[str, float]:
    """Another bulk load, sampled by py-spy: where the consumer's wall time goes beside its model. Apart
    from the measured one, as the sampling takes CPU from the consumer on a small machine."""
    rows = bm.corpus_rows(corpus, PROFILED_N, skip=skip, id_base=BULK_IDS + skip)
    say(f"py-spy on the consumer: COPY {len(rows)} more rows ...")
    profiler = PySpy(pid, settings.stack_dir / "logs" / "bench-consumer-bulk.pyspy.txt").start()
    bulk_throughput(conn, settings, rows, say)
    shares = profiler.stop()
    if shares:
        say("  its Python threads busy, share of the wall time: "
            + ", ".join(f"{name} {share:.1%}" for name, share in shares.items()))  # fmt: skip
    return {f"pyspy_{name.replace(' ', '_')}": share for name, share in shares.items()}


def model_share(before: Samples, after: Samples, bulk: dict[str, float]) -> dict[str, float]:
    """Where the bulk load's time went in the consumer, from its metrics: the share of the wall time its
    model ran (the rest is the pipeline around it), and its model's speed there against the raw model's
    beside (below 1: the stack's own processes took CPU from it)."""
    model_s, db_s = (
        after.get((f"cdc_embedder_{m}_seconds_sum", ()), 0.0)
        - before.get((f"cdc_embedder_{m}_seconds_sum", ()), 0.0)
        for m in ("model", "db")
    )
    model_rate = bulk["embedded"] / model_s if model_s > 0 else math.nan
    return {
        "consumer_model_s": model_s,
        "consumer_db_s": db_s,
        "model_busy_fraction": model_s / bulk["seconds"] if bulk["seconds"] > 0 else math.nan,
        # the vector writes: on shared cores mostly the database's own CPU for the HNSW insert
        "db_busy_fraction": db_s / bulk["seconds"] if bulk["seconds"] > 0 else math.nan,
        "consumer_model_texts_per_s": model_rate,
        "consumer_model_to_raw": model_rate / bulk["raw_beside_texts_per_s"],
    }


def pipeline_phases(
    args: BenchArgs, env: dict[str, str], settings: Settings, result: dict[str, Any], say: Say
) -> None:
    from consumer.connectors import load_connector_file, register_connector
    from consumer.stack import LocalStack

    stack = LocalStack(settings)
    stack.down(purge=True, progress=say)  # a clean start, whatever an earlier run left
    stack.up(progress=say)
    create_source_table(settings)
    register_connector(settings, progress=say)
    connector = load_connector_file()["name"]
    layout = split()
    latency_rows = bm.corpus_rows(
        args.corpus, (7 if layout else 3) * args.latency_n, skip=40_000, id_base=LATENCY_IDS
    )
    capture_rows, rounds_rows = latency_rows[: args.latency_n], iter(latency_rows[args.latency_n :])
    capture_ids = (LATENCY_IDS, LATENCY_IDS + args.latency_n)
    with psycopg.connect(settings.dsn) as conn:
        say(f"insert latency, connector running, no consumer ({args.latency_n} rows) ...")
        capture_only = summary(insert_latencies(conn, capture_rows, args.latency_pace_s))
        latencies: dict[str, list[float]] = {}
        database = [pid for pid in (stack.postgres.pid(),) if pid]
        jvms = [pid for pid in (stack.kafka.pid(), stack.connect.pid()) if pid]
        if layout:
            latencies |= separate_cores(
                conn, env, connector, list(islice(rounds_rows, 2 * args.latency_n)), args.latency_rounds,
                args.latency_pace_s, (layout, database, jvms), capture_ids, say,
            )  # fmt: skip
            latencies |= vectors_apart(
                conn, env, connector, list(islice(rounds_rows, 2 * args.latency_n)), args.latency_rounds,
                args.latency_pace_s, (layout, database, jvms), say,
            )  # fmt: skip
        consumer = ConsumerProcess(env, settings.stack_dir / "logs" / "bench-consumer.log").start()
        sampler = RssSampler(consumer.pid, 10.0 if args.soak_minutes > 0 else 1.0).start()
        try:
            consumer.wait_ready().wait_audited()
            say(f"consumer ready (pid {consumer.pid}); warm-up ...")
            wait_embedded(conn, settings, *capture_ids, 300, say)
            latencies |= alternating(
                conn, settings, connector, list(rounds_rows), args.latency_rounds, args.latency_pace_s,
                None, say,
            )  # fmt: skip
            latency = ratios(latencies)
            shown = [
                f"{k} {latency[k]:.2f}"
                for k in ("p99_ratio", "separate_p99_ratio", "apart_p99_ratio")
                if k in latency
            ]
            say(f"  insert p99 running/stopped: {', '.join(shown)}")
            latency["rounds"] = args.latency_rounds
            latency["connector running, no consumer"] = capture_only
            latency["layout"] = (
                f"{layout.describe()}, a consumer with CDC_TORCH_THREADS={len(layout.pipeline)} there"
                if layout
                else "one CPU: no separated measurement"
            )
            result["insert_latency"] = latency
            n_bulk = args.n if args.soak_minutes <= 0 else min(args.n, 500)
            bulk_rows = bm.corpus_rows(args.corpus, n_bulk, id_base=BULK_IDS)
            before = consumer.metrics()
            processes = {CONSUMER: [consumer.pid], "database": database, "kafka and connect": jvms}
            bulk = end_to_end(conn, settings, bulk_rows, args.soak_minutes <= 0, processes, say)
            bulk.update(model_share(before, consumer.metrics(), bulk))
            if args.soak_minutes <= 0:
                bulk |= profiled_bulk(conn, settings, consumer.pid, args.corpus, n_bulk, say)
            say(
                f"  consumer's model busy {bulk['model_busy_fraction']:.0%} of the time, its database writes "
                f"{bulk['db_busy_fraction']:.0%}; the model at "
                f"{bulk['consumer_model_to_raw']:.2f} of the raw model's speed beside"
            )
            raw = result.get("raw", {}).get("texts_per_s", math.nan)
            bulk["ratio_to_model_phase"] = bulk["texts_per_s"] / raw if raw == raw else math.nan
            result["end_to_end"] = bulk
            rate = max(bulk["texts_per_s"] / 2, 0.5)
            ab_rate = max(bulk["texts_per_s"] * args.ab_load, 0.5)
            key, ids, duration = (
                ("soak", SOAK_IDS, args.soak_minutes * 60) if args.soak_minutes > 0
                else ("freshness", STEADY_IDS, args.freshness_s)
            )  # fmt: skip
            say(f"{key}: {rate:.1f} rows/s for {duration:.0f} s ...")
            before = consumer.metrics()
            steady = steady_load(
                conn, settings, cycle_rows(args.corpus, ids, skip=n_bulk), rate, duration, say
            )
            after = consumer.metrics()
            # the consumer's own view, and the capture (Debezium) part of it
            for part in ("end_to_end", "capture"):
                buckets = histogram_buckets(before, after, f"cdc_embedder_{part}_seconds")
                steady[f"histogram_{part}_s"] = {
                    f"p{q}": histogram_quantile(q / 100, buckets) for q in (50, 95, 99)
                }
            result["freshness"] = steady
            if key == "soak":
                result["soak"] = {"minutes": args.soak_minutes, "series": steady["series"]}
            f = steady["freshness_s"]
            say(f"  freshness p50/p95/p99 {f['p50']:.2f}/{f['p95']:.2f}/{f['p99']:.2f} s")
        finally:
            sampler.stop()
            consumer.stop()
    samples = sampler.samples
    tail = [s for s in samples if s[0] >= samples[-1][0] / 5] if samples else []
    result["memory"] = {
        "peak_bytes": float(sampler.peak),
        "cuda_library_bytes": float(sampler.cuda_library_bytes),
        "final_bytes": float(samples[-1][1]) if samples else math.nan,
        "slope_mb_per_h": slope([t for t, _ in tail], [r / 2**20 for _, r in tail]) * 3600,
        "samples": samples,
    }
    final_mb = result["memory"]["final_bytes"] / 2**20
    say(
        f"consumer RSS peak {sampler.peak / 2**20:.0f} MB, final {final_mb:.0f} MB, of which "
        f"{sampler.cuda_library_bytes / 2**20:.0f} MB CUDA libraries (absent with the image's CPU-only torch)"
    )
    if args.soak_minutes <= 0 and args.ab_rounds > 0:
        ab_rows = cycle_rows(args.corpus, AB_IDS, skip=n_bulk)
        ab_log = settings.stack_dir / "logs" / "bench-consumer-ab.log"
        with psycopg.connect(settings.dsn) as conn:
            result["freshness_ab"] = freshness_ab(
                conn, env, ab_rows, ab_rate, args.ab_seconds, args.ab_rounds, ab_log, say
            )
    if args.soak_minutes <= 0 and args.write_ab_rounds > 0:
        write_rows = cycle_rows(args.corpus, WRITE_AB_IDS, skip=n_bulk)
        write_log = settings.stack_dir / "logs" / "bench-consumer-write-ab.log"
        with psycopg.connect(settings.dsn) as conn:
            placement = (layout, database, jvms) if layout else None
            result["write_parts_ab"] = write_parts_ab(
                conn, env, write_rows, args.write_ab_n, args.write_ab_rounds, placement, write_log, say
            )
    if args.soak_minutes <= 0 and args.chunked_n > 0:
        *chunked_rows, warm_up = longest_rows(args.corpus, args.chunked_n + 1, CHUNKED_IDS)
        with psycopg.connect(settings.dsn) as conn:
            result["chunked"] = chunked_throughput(conn, env, chunked_rows, [warm_up], args.rounds, say)
    if args.soak_minutes <= 0 and args.remote_n > 0:  # the local consumer is stopped: the server has the CPUs
        remote_rows = bm.corpus_rows(args.corpus, args.remote_n, skip=30_000, id_base=REMOTE_IDS)
        with psycopg.connect(settings.dsn) as conn:
            result["remote"] = remote_path(conn, env, settings, remote_rows, Path(settings.model), say)
