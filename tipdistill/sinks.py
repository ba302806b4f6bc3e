"""[7] Metric sinks: local files always, W&B as an extra sink, a null sink otherwise.

`open_sink` returns one `Sink` whatever `logger.name` is, so the training loop never branches on
`if wandb:`. Every `log` goes to `run_dir/metrics.jsonl` (flushed per line) and `summary` to
`run_dir/summary.json` (atomic replace); `report.py` reads only these, so tables never depend on
the network. The W&B part is the registered extra (`none` | `wandb`); when W&B fails at init or
mid-run it warns once and becomes a no-op, the local files go on. A resumed run continues the same
W&B run (`wandb_run_id`), and of the steps it trains again after its checkpoint W&B gets only what
its own transaction logs (`wandb/*run-*/run-<id>.wandb`) show it does not hold yet.

Also here: `run_name_from_overrides` (run names and dir tags), `StepTimer` (`time/*`) and
`UpdateMemoryProbe` (`mem/*`).
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import numbers
import os
import re
import secrets
import struct
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional
from urllib.parse import urlsplit

from tipdistill.registry import Registry

if TYPE_CHECKING:  # annotations only: config.py imports this module to check logger names
    from tipdistill.config import LoggerConfig

log = logging.getLogger(__name__)

SINKS = Registry("logger", "logger.name")
NAMESPACES = ("train", "select", "score", "rollout", "mem", "time", "perf", "optim", "eval", "loss", "tables")
WANDB_TABLE_MAX_ROWS = 2000  # run.log cuts tables at 10k rows (P13); keep W&B tables small, parquet has all


def _jsonable(v: Any) -> Any:
    """Tensors / numpy values -> Python numbers or lists, so a stray `loss` tensor does not kill the run."""
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------- extra sinks (the registry)


@SINKS.register("none")
class NullExtra:
    """No extra sink: every call is a no-op (nanochat's DummyWandb)."""

    # (step, "metrics" | "tables/<name>") the remote run already holds from an earlier session of
    # this run directory: a resumed run trains the steps after its checkpoint again
    logged: frozenset = frozenset()

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def log(self, metrics: dict) -> None:
        pass

    def log_table(self, name: str, df: Any, step: int) -> None:
        pass

    def summary(self, d: dict) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass


def _has_stored_login() -> bool:
    """`wandb login` stores the key in ~/.netrc (or $NETRC) under the API host."""
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: Optional[str]) -> str:
    """logger.mode, else $WANDB_MODE, else online only with a key: a run never waits on a login."""
    if mode:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") or _has_stored_login() else "offline"


def wandb_run_id(run_dir: Path, *, resume: bool, derived: Optional[str] = None) -> tuple[str, bool]:
    """(W&B run id, whether an earlier session of this run directory used it).

    The one rule for the id, kept in `run_dir/wandb_run_id`: a resumed run reuses the stored id, so every
    session of a run directory logs to one W&B run. A run that starts gets `derived` when given (a sweep
    job's id from its sweep directory and job number, `cluster.sweep_run_id`: a requeued job that saved
    no checkpoint yet starts again in the same W&B run) or else a new random id (a fresh run in a reused
    directory is a new W&B run)."""
    path = Path(run_dir) / "wandb_run_id"
    stored = path.read_text().strip() if path.is_file() else ""
    if stored and (resume or stored == derived):
        return stored, True
    run_id = derived or secrets.token_hex(8)  # W&B ids: letters, digits, '-', '_'; 64 random bits
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id, False


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B transaction log (`run-<id>.wandb`), stopping at one cut short (a kill).

    The file is LevelDB's log format: a 7-byte header (`:W&B`, magic, version), then records in
    32 KiB blocks, each with a 7-byte header (crc32, length, kind: 1 full, 2 first, 3 middle,
    4 last) and a serialised `wandb_internal_pb2.Record`. wandb 0.31 reads it in Go only."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if len(chunk) < length:
            return
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            try:
                record.ParseFromString(buf)
            except Exception:  # noqa: BLE001 - a damaged record ends what can be trusted
                return
            yield record


def wandb_logged(run_dir: Path, run_id: str) -> frozenset:
    """(train/step, "metrics" | "tables/<name>") of every history row this machine's W&B sessions
    of the run recorded. What an interrupted session only handed to wandb.log (lost when the
    process was killed) is not there, so it is sent again rather than skipped."""
    logged = set()
    for path in Path(run_dir).glob(f"wandb/*/run-{run_id}.wandb"):  # one folder per session (W&B adds -1 within a second)
        try:
            for record in wandb_records(path):
                if record.WhichOneof("record_type") != "history":
                    continue
                keys = {item.key or item.nested_key[0]: item.value_json for item in record.history.item}
                if "train/step" in keys:
                    tables = sorted(k for k in keys if k.startswith("tables/"))
                    logged.add((int(float(keys["train/step"])), tables[0] if tables else "metrics"))
        except (OSError, ValueError) as exc:
            log.warning("cannot read W&B log %s (%s); its steps may be logged twice", path, _first_line(exc))
    return frozenset(logged)


@SINKS.register("wandb")
class WandbExtra(NullExtra):
    """One W&B run per run directory; x-axis `train/step` (never `step=`, P12); failures degrade to a no-op."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, *, run_name: str, group: Optional[str], config: dict,
                 resume: bool = False, run_id: Optional[str] = None):
        self.run = None  # kept after a failure so close() can still finish it
        self.ok = False
        self._defined: set[str] = set()
        try:
            import wandb

            run_id, continues = wandb_run_id(run_dir, resume=resume, derived=run_id)
            self.logged = wandb_logged(run_dir, run_id) if continues else frozenset()
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, mode=resolve_wandb_mode(cfg.mode), group=group,
                name=run_name, job_type="train", tags=list(cfg.tags), dir=str(run_dir), config=config,
                id=run_id, resume="allow",  # a resumed or requeued job continues the W&B run of its run directory
                reinit="finish_previous",  # the default reuses the previous job's run in a multirun (P4)
            )
            self.run.define_metric("train/step")
            self.run.define_metric("train/loss", step_metric="train/step", summary="min")
            for ns in NAMESPACES:
                self._define(f"{ns}/*")
            self.ok = True
        except Exception as exc:  # no network, bad key, quota: local files are enough
            self._fail("init", exc)

    def _fail(self, where: str, exc: BaseException) -> None:
        log.warning("W&B %s failed, continuing with local files only (%s)", where, _first_line(exc))
        self.ok = False

    def _define(self, key: str) -> None:
        """Plot every namespace (or bare key) against train/step; declared once, on first sight."""
        glob = key.split("/", 1)[0] + "/*" if "/" in key else key
        if glob not in self._defined and key != "train/step":
            self._defined.add(glob)
            self.run.define_metric(glob, step_metric="train/step", summary="max" if glob == "eval/*" else None)

    def log(self, metrics: dict) -> None:
        if not self.ok:
            return
        try:
            row = {k: v for k, v in metrics.items() if k != "step"}
            for k in row:
                self._define(k)
            row["train/step"] = metrics["step"]
            self.run.log(row)
        except Exception as exc:
            self._fail("log", exc)

    def log_table(self, name: str, df: Any, step: int) -> None:
        if not self.ok:
            return
        try:
            import wandb

            table = wandb.Table(dataframe=df.head(WANDB_TABLE_MAX_ROWS).reset_index(drop=True))
            self.run.log({f"tables/{name}": table, "train/step": step})
        except Exception as exc:
            self._fail("log_table", exc)

    def summary(self, d: dict) -> None:
        if not self.ok:
            return
        try:
            for k, v in d.items():
                self.run.summary[k] = v
        except Exception as exc:
            self._fail("summary", exc)

    def close(self, exit_code: int = 0) -> None:
        run, self.run, self.ok = self.run, None, False
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:
                log.warning("W&B finish failed (%s)", _first_line(exc))


# ---------------------------------------------------------------- the sink the loop uses


class Sink:
    """metrics.jsonl + summary.json + an extra sink; a context manager that closes on every path."""

    def __init__(self, run_dir: Path, extra: Optional[NullExtra] = None, *, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.extra = extra if extra is not None else NullExtra()
        self.last_step = 0
        self._summary: dict = {}
        summary_path = self.run_dir / "summary.json"
        if resume and summary_path.is_file():
            self._summary = json.loads(summary_path.read_text())
        # resume appends: steps already in the file stay, the trainer continues after them
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a" if resume else "w", encoding="utf-8")

    def log(self, metrics: dict) -> None:
        """One JSON line per call; `metrics["step"]` (an int) is the x-axis everywhere."""
        step = metrics.get("step")
        if not isinstance(step, numbers.Integral) or isinstance(step, bool):
            raise ValueError(f"sink.log needs an integer 'step' in the dict, got {step!r}")
        metrics = {**metrics, "step": int(step)}
        self.last_step = int(step)
        self._jsonl.write(json.dumps(metrics, default=_jsonable) + "\n")
        self._jsonl.flush()
        if (self.last_step, "metrics") not in self.extra.logged:
            self.extra.log(metrics)

    def log_table(self, name: str, df: Any) -> Path:
        """All rows to `tables/<name>_step<step>.parquet`; W&B gets a cut-down table (P13)."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        path = self.run_dir / "tables" / f"{safe}_step{self.last_step}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(path, index=False)
        if (self.last_step, f"tables/{name}") not in self.extra.logged:
            self.extra.log_table(name, df, self.last_step)
        return path

    def summary(self, d: dict) -> None:
        """Merge into summary.json (atomic: a crash never leaves half a file) and the W&B summary."""
        self._summary.update(d)
        fd, tmp = tempfile.mkstemp(dir=self.run_dir, prefix=".summary.", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._summary, f, indent=2, default=_jsonable)
            os.replace(tmp, self.run_dir / "summary.json")
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.extra.summary(d)

    def close(self, exit_code: int = 0) -> None:
        if not self._jsonl.closed:
            self._jsonl.close()
        self.extra.close(exit_code)

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)  # W&B marks the run failed on 1


class SilentSink(Sink):
    """The sink of a process that does not write (every rank of a job but the main one): same calls, no files."""

    def __init__(self):  # no files opened
        self.run_dir, self.extra, self.last_step, self._summary = None, NullExtra(), 0, {}

    def log(self, metrics: dict) -> None:
        self.last_step = int(metrics.get("step", self.last_step))

    def log_table(self, name: str, df: Any) -> None:  # type: ignore[override]
        return None

    def summary(self, d: dict) -> None:
        self._summary.update(d)

    def close(self, exit_code: int = 0) -> None:
        pass


def open_sink(cfg: LoggerConfig, run_dir: Path, *, run_name: str, group: Optional[str], config: dict,
              run_id: Optional[str] = None, resume: bool = False, enabled: bool = True) -> Sink:
    """The one sink of a job. `config` must be a plain resolved dict (`config.to_plain`, P7). `enabled=False`
    (a job's non-main ranks) gives a sink that writes nothing: one W&B run and one metrics file per job."""
    if not isinstance(config, dict):  # a DictConfig shows raw ${...} in W&B (P7)
        raise TypeError(f"open_sink needs a plain resolved dict (tipdistill.config.to_plain(cfg)), got {type(config).__name__}")
    if not enabled:
        return SilentSink()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    extra_cls = SINKS.get(cfg.name)
    sink = Sink(run_dir, resume=resume)  # local files first: they exist even if W&B init hangs or dies
    sink.extra = extra_cls(cfg, run_dir, run_name=run_name, group=group, config=config, resume=resume, run_id=run_id)
    return sink


# ---------------------------------------------------------------- run names

_GROUPS = {"model", "task", "rollout", "selector", "scoring", "loss", "optim", "logger", "eval", "experiment", "debug", "sweep"}
_DROP = re.compile(r"^(logger|hydra)(\.|$)|^model\.(student|teacher)$|^resume$|(^|\.)(path|dir|output_dir|cache_dir|device)$")


def run_name_from_overrides(overrides: list[str]) -> str:
    """["selector=type_aware", "keep=0.2", "seed=1"] -> "type_aware-keep0.2-seed1" (P8: no '/', no shell-hostile chars)."""
    parts = []
    for ov in overrides:
        if "=" not in ov or ov.startswith("~"):
            continue
        key, value = ov.split("=", 1)
        key = key.lstrip("+")
        if _DROP.search(key):
            continue
        leaf = key.rsplit(".", 1)[-1]
        parts.append(value if key in _GROUPS or leaf == "name" else f"{leaf}{value}")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("_.-")[:120]
    return name or "default"


# ---------------------------------------------------------------- time and memory


def _cuda_sync() -> None:
    """Wait for queued kernels before reading a clock; never the first CUDA touch (vLLM forks, P10)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimer:
    """`with timer("rollout"): ...` adds the seconds to `timer.metrics["time/rollout_s"]`.

    A phase entered twice in one step (micro-batches) accumulates; `pop()` returns and resets.
    `groups` maps finer phases onto one metric (update.PHASES: the update step's phases -> update/select).
    """

    def __init__(self, metrics: Optional[dict] = None, groups: Optional[dict[str, str]] = None):
        self.metrics = {} if metrics is None else metrics
        self.groups = groups or {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        _cuda_sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _cuda_sync()
            key = f"time/{self.groups.get(phase, phase)}_s"
            self.metrics[key] = self.metrics.get(key, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict:
        out = dict(self.metrics)
        self.metrics.clear()
        return out


_GIB = float(1 << 30)


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class UpdateMemoryProbe:
    """Peak memory of a code region, in GiB: `with probe: update()`, then `probe.metrics`.

    CUDA: torch allocator peaks of the region (`reset_peak_memory_stats` before, `max_memory_allocated`
    / `max_memory_reserved` after): absolute, so they include weights and optimizer state, and exclude
    vLLM's KV cache (P11). CPU: the high-water mark of the process RSS above its value at entry,
    sampled every `interval_s` by a thread reading /proc/self/statm (Linux; NaN elsewhere). A spike
    shorter than the interval can be missed, and memory freed to the allocator but kept resident is
    not "new" memory on a second call.
    """

    def __init__(self, device: Any = None, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.metrics: dict[str, float] = {}

    def _is_cuda(self) -> bool:
        import torch

        if self.device is None:
            return torch.cuda.is_available()
        return torch.device(self.device).type == "cuda"

    def __enter__(self) -> "UpdateMemoryProbe":
        self.metrics = {}
        self._cuda = self._is_cuda()
        if self._cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base = _rss_bytes()
        self._peak = self._base or 0
        self._stop = threading.Event()
        self._thread = None
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, name="rss-probe", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._cuda:
            import torch

            torch.cuda.synchronize(self.device)
            self.metrics = {
                "mem/update_peak_gib": torch.cuda.max_memory_allocated(self.device) / _GIB,
                "mem/update_peak_reserved_gib": torch.cuda.max_memory_reserved(self.device) / _GIB,
            }
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes() or 0)
            self.metrics = {"mem/update_peak_gib": (self._peak - self._base) / _GIB}
        else:
            self.metrics = {"mem/update_peak_gib": math.nan}
