"""Exporting a sentence-transformers model to OpenVINO IR, lossless or int8 (`cdc-embedder openvino-export`).

The model is converted from the torch module in this process: no hub, no optimum-intel (which pins older
transformers and huggingface-hub than ours). Only the transformer becomes IR; pooling and normalisation
stay in numpy (consumer.embedders.openvino), in fp32 whatever precision the IR runs at, as in torch.

A folder is complete once its metadata file exists: it is written last, into a temporary folder renamed
into place, so an export killed halfway leaves nothing that a later load would take for a model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consumer.embedders.base import ModelLoadError
from consumer.events import TEXT_SEPARATOR
from consumer.settings import Settings, env_name

IR_FILE = "model.xml"
META_FILE = "cdc-embedder-export.json"
log = logging.getLogger(__name__)


def model_key(model: str) -> str:
    """A local folder by its absolute path (two checkouts' relative paths are different models)."""
    local = Path(model).expanduser()
    return str(local.resolve()) if local.exists() else model


def fingerprint(model: str) -> str:
    """A digest of a local folder's files: a model replaced in the same folder (retrained, another
    revision copied over) is exported anew instead of serving the old one's IR, while a copy of the same
    files (an image layer, new modification times) finds its export."""
    local = Path(model).expanduser()
    if not local.is_dir():
        return ""
    files = sorted(p for p in local.rglob("*") if p.is_file())
    listing = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _content_digest(listing)


@functools.lru_cache(maxsize=16)
def _content_digest(listing: tuple[tuple[str, int, int], ...]) -> str:
    """Keyed by names, sizes and times, so a start reads the weights once, not at each look-up."""
    digest = hashlib.sha256()
    for name, _, _ in listing:
        digest.update(Path(name).name.encode())
        with open(name, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def cache_folder(settings: Settings) -> Path:
    """<cache dir>/<model name>-<hash of its path or id, and its files>-<lossless|int8>."""
    key = model_key(settings.model)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(key.rstrip("/")).name).strip("-.") or "model"
    mode = "int8" if settings.embed_quantization == "int8" else "lossless"
    digest = hashlib.sha256(f"{key}\n{fingerprint(settings.model)}".encode()).hexdigest()[:8]
    return settings.openvino_cache_dir.expanduser() / f"{name}-{digest}-{mode}"


def read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta: dict[str, Any] = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if (folder / IR_FILE).is_file() else None


def calibration_texts(path: Path, n: int) -> list[str]:
    """The first `n` texts of a file: a line each, or for JSONL (.jsonl, .json) a JSON string, or an
    object's string values joined as the consumer joins text columns."""
    texts: list[str] = []
    jsonl = path.suffix in (".jsonl", ".json")
    try:
        with path.open() as f:
            for number, line in enumerate(f, 1):
                if len(texts) >= n:
                    break
                if not line.strip():
                    continue
                value = json.loads(line) if jsonl else line.rstrip("\n")
                if isinstance(value, dict):
                    value = TEXT_SEPARATOR.join(
                        v.strip() for v in value.values() if isinstance(v, str) and v.strip()
                    )
                if not isinstance(value, str):
                    raise ValueError(f"line {number} is neither a string nor an object")
                if value.strip():
                    texts.append(value)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read calibration texts from {path}: {exc}") from None
    if not texts:
        raise ModelLoadError(f"{path} holds no calibration text")
    return texts


def export(settings: Settings, calibration: Sequence[str] = ()) -> dict[str, Any]:
    """Export CDC_MODEL into `cache_folder(settings)`; for int8, quantize on the calibration texts."""
    import openvino as ov
    import torch

    from consumer.embedders.local import _load

    int8 = settings.embed_quantization == "int8"
    if int8 and not calibration:
        raise ModelLoadError("an int8 export needs calibration texts")
    folder = cache_folder(settings)
    started = time.perf_counter()
    model = _load(settings.model)
    transformer = _check_layout(model, settings)
    tokenizer = model.tokenizer
    window = int(model.max_seq_length or 512)
    names = list(tokenizer.model_input_names)
    example = tokenizer(["an example", "a second, longer example"], padding=True, return_tensors="pt")

    class LastHiddenState(torch.nn.Module):
        """The model's token vectors alone (no pooler head): the tensor the numpy pooling reads."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            given = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **given).last_hidden_state

    # tracing warns of every Python branch on a shape; with dynamic axes declared, none is a problem
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ir = ov.convert_model(
            LastHiddenState(transformer.auto_model).eval(),
            example_input={k: example[k] for k in names},
            input=[(k, ov.PartialShape([-1, -1]), ov.Type.i64) for k in names],
        )
    report: dict[str, Any] = {"convert_s": time.perf_counter() - started}
    if int8:
        import nncf

        started = time.perf_counter()
        items = [
            {k: v for k, v in tokenizer(t, truncation=True, max_length=window, return_tensors="np").items()}
            for t in calibration
        ]
        ir = nncf.quantize(
            ir,
            nncf.Dataset(items),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(items),
        )
        report["quantize_s"] = time.perf_counter() - started
    meta = {
        "model": model_key(settings.model),
        "quantization": settings.embed_quantization,
        "max_seq_length": window,
        "dimension": int(model.get_embedding_dimension() or 0),
        "calibration_texts": len(calibration) if int8 else 0,
        "openvino": ov.get_version(),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        ov.save_model(ir, tmp / IR_FILE, compress_to_fp16=False)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report |= {"folder": str(folder), "bytes": sum(f.stat().st_size for f in folder.iterdir()), **meta}
    return report


def export_apart(settings: Settings) -> None:
    """The lossless export on first use, unless another process made it meanwhile (consumers of one
    deployment start together), in a spawned process: the torch and sentence-transformers it needs would
    stay in the caller's memory (about 700 MB of a consumer's RSS) while the exported model needs neither."""
    import fcntl
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    folder = cache_folder(settings)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = (folder.parent / f".{folder.name}.lock").open("w")
    except OSError as exc:
        raise ModelLoadError(
            f"no OpenVINO export of {settings.model!r} in {folder}, and none can be written there ({exc}): "
            f"set {env_name('openvino_cache_dir')} to a writable folder, or export it beforehand with "
            "`cdc-embedder openvino-export`"
        ) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a start that waits says why, instead of hanging silently
            log.info("waiting for another process's OpenVINO export of %s into %s", settings.model, folder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if read_meta(folder) is None:  # here, not before the lock: only the process that exports says so
            log.info("exporting %s to OpenVINO IR in %s (first use)", settings.model, folder)
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                pool.submit(export, settings).result()


def _check_layout(model: Any, settings: Settings) -> Any:
    """Transformer, mean pooling, maybe Normalize: what the numpy side reproduces. Others stay on torch."""
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    modules = list(model)
    fits = (
        len(modules) in (2, 3)
        and isinstance(modules[0], Transformer)
        and isinstance(modules[1], Pooling)
        and modules[1].pooling_mode in ("mean", ("mean",))
        and all(isinstance(m, Normalize) for m in modules[2:])
    )
    if not fits:
        layout = ", ".join(f"{type(m).__name__}" for m in modules)
        raise ModelLoadError(
            f"{settings.model!r} ({layout}) is not a transformer with mean pooling, the only layout the "
            f"openvino runtime embeds: set {env_name('embed_runtime')}=torch"
        )
    return modules[0]
