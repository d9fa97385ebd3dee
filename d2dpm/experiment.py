"""The one entry point the CLI and both UIs call: a comparison of methods on shared noise.

`Workbench` owns what is expensive and shareable (loaded models, calibrated statistics,
quantized networks), each built once per key and safe to share between threads; a comparison
itself keeps all its state in local variables, so concurrent visitors cannot disturb each other.
What a comparison is, with its defaults, is `d2dpm.config.CompareConfig`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import torch
from torch import nn

from .calibration import ProgressCallback, calibrate
from .config import CompareConfig, StatsConfig
from .corrections import make_correction
from .errors import Cancelled, ConfigError
from .methods import METHODS
from .metrics import per_image_errors, trajectory_table
from .models import ASSETS_DIR, DiffusionModel, NoisePredictor, load_model
from .noise_model import NoiseStatistics
from .quant import Efficiency, count_macs, efficiency, quantize_network
from .sampler import SamplerNoise, StepRecord, Track, sample
from .schedule import DDIMSchedule

log = logging.getLogger(__name__)

# In-memory caches of a Workbench, least recently used dropped first (a quantized network is a copy of the model).
MAX_CACHED_STATS = int(os.environ.get("D2DPM_MAX_CACHED_STATS", "32"))
MAX_CACHED_NETWORKS = int(os.environ.get("D2DPM_MAX_CACHED_NETWORKS", "4"))
# The statistics cache on disk (cache_dir/stats): files beyond this count or total size go, least
# recently used first (a cache hit marks its file as used), so calibrations on a public server
# cannot fill its disk.
MAX_DISK_STATS = int(os.environ.get("D2DPM_MAX_DISK_STATS", "256"))
MAX_DISK_STATS_MB = float(os.environ.get("D2DPM_MAX_DISK_STATS_MB", "256"))
SHIPPED_STATS_DIR = ASSETS_DIR / "stats"


def default_cache_dir() -> Path:
    return Path(os.environ.get("D2DPM_CACHE_DIR", Path.home() / ".cache" / "d2dpm"))


class LRU:
    """A thread-safe mapping that keeps the `size` most recently used entries."""

    def __init__(self, size: int):
        self.size, self._lock, self._items = max(1, int(size)), threading.Lock(), OrderedDict()

    def get(self, key, default=None):
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    def __setitem__(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class KeyedLocks:
    """One lock per key while anyone holds or waits for it; forgotten after (so the table stays small)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._locks: dict[str, list] = {}  # key → [lock, users]

    @contextmanager
    def __call__(self, key: str):
        with self._lock:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._locks)


def load_statistics(path, expected: StatsConfig | None = None) -> NoiseStatistics:
    """NoiseStatistics.load, with any failure of a damaged file as the ConfigError it is."""
    try:
        return NoiseStatistics.load(path, expected=expected)
    except ConfigError:
        raise
    except Exception as error:  # a file with the right metadata but damaged tensors
        raise ConfigError("stats", str(path), f"a complete statistics file written by `d2dpm stats` ({type(error).__name__} reading it)") from None


@dataclass
class CompareProgress:
    """Streamed while sampling: the predicted x_0 of every method after step `step` (1-based)."""

    step: int
    total: int
    x0: dict[str, torch.Tensor]


@dataclass
class ComparisonResult:
    config: CompareConfig
    model: DiffusionModel
    labels: torch.Tensor | None  # the class of each image
    samples: dict[str, torch.Tensor]  # method → final samples [N, *shape]
    records: list[dict[str, StepRecord]]  # per step: method → record
    trajectory: pd.DataFrame  # one row per method and step
    metrics: pd.DataFrame  # one row per method
    per_image: pd.DataFrame  # one row per method and image
    stats: NoiseStatistics
    stats_table: pd.DataFrame  # one row per step
    efficiency: Efficiency
    stats_source: str  # "shipped", "cache", "calibrated" or a file path

    def run_info(self) -> dict:
        """The full configuration and the efficiency row, JSON-ready."""
        return {
            "config": dataclasses.asdict(self.config),
            "model_identity": self.model.identity,
            "stats": dataclasses.asdict(self.stats.config),
            "stats_source": self.stats_source,
            "efficiency": self.efficiency.as_dict(),
            "class_labels": self.labels.tolist() if self.labels is not None else None,
            "class_names": [self.model.class_names[i] for i in self.labels.tolist()] if self.labels is not None and self.model.class_names else None,
        }


class Workbench:
    """Shared, thread-safe store of models, statistics and quantized networks."""

    def __init__(self, cache_dir: Path | None = None, device: str | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._lock_for = KeyedLocks()
        self._stats = LRU(MAX_CACHED_STATS)  # key → (statistics, source)
        self._quantized = LRU(MAX_CACHED_NETWORKS)  # key → quantized network
        self._macs = LRU(MAX_CACHED_NETWORKS)  # model identity → MACs per layer

    def model(self, spec: str, public: bool = False) -> DiffusionModel:
        model = load_model(spec, public=public)
        model.network.to(self.device)
        return model

    # -- statistics: explicit file → shipped → disk cache → calibrate (and cache)

    def find_statistics(self, config: StatsConfig, stats_path: str | None = None) -> tuple[NoiseStatistics, str] | None:
        """The statistics of `config` if they exist without calibrating (explicit file, memory, shipped, disk cache), else None."""
        if stats_path is not None:
            return load_statistics(stats_path, expected=config), str(stats_path)
        key = config.key()
        found = self._stats.get(key)
        if found is None:
            found = self._shipped(config) or self._cached(config)
            if found is not None:
                self._stats[key] = found
        return found

    def statistics(self, model: DiffusionModel, config: StatsConfig, stats_path: str | None = None,
                   progress: ProgressCallback | None = None, allow_calibration: bool = True) -> tuple[NoiseStatistics, str]:
        if stats_path is not None:
            return self.find_statistics(config, stats_path)
        key = config.key()
        with self._lock_for("stats:" + key):
            found = self.find_statistics(config)
            if found is None:
                if not allow_calibration:
                    raise ConfigError("calib_samples", config.calib_samples, "a configuration whose statistics are ready "
                                      "(they were dropped from the cache since this run was planned: run it again)")
                calibrated = calibrate(model, config, self.device, progress)
                found = (calibrated.stats, "calibrated")
                self._store_in_cache(calibrated.stats)
                self._quantized[key] = calibrated.quantized_network
                self._stats[key] = found
            return found

    def add_statistics(self, stats: NoiseStatistics) -> None:
        """Keep statistics calibrated elsewhere (the benchmark times `calibrate` itself) for their configuration."""
        with self._lock_for("stats:" + stats.config.key()):
            self._stats[stats.config.key()] = (stats, "calibrated")

    def _shipped(self, config: StatsConfig) -> tuple[NoiseStatistics, str] | None:
        path = SHIPPED_STATS_DIR / f"{config.key()}.safetensors"
        if path.is_file():
            return load_statistics(path, expected=config), "shipped"
        return None

    def _cache_path(self, config: StatsConfig) -> Path:
        return self.cache_dir / "stats" / f"{config.key()}.safetensors"

    def _cached(self, config: StatsConfig) -> tuple[NoiseStatistics, str] | None:
        path = self._cache_path(config)
        if not path.is_file():
            return None
        try:
            found = load_statistics(path, expected=config), "cache"
        except ConfigError as error:  # corrupted or stale: recalibrate rather than fail
            log.warning("ignoring cache entry %s (%s); recalibrating", path, error)
            return None
        try:
            os.utime(path)  # used just now: the last file the size limit removes
        except OSError:
            pass
        return found

    def _store_in_cache(self, stats: NoiseStatistics) -> None:
        path = self._cache_path(stats.config)
        temporary = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stats.save(temporary)
            temporary.replace(path)  # atomic: a reader never sees half a file
        except OSError as error:
            log.warning("could not cache statistics at %s: %s", path, error)
            temporary.unlink(missing_ok=True)
            return
        self.prune_cache(keep=path)

    def prune_cache(self, max_files: int | None = None, max_mb: float | None = None, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used statistics files of the disk cache until at most `max_files`
        (MAX_DISK_STATS) remain, totalling at most `max_mb` (MAX_DISK_STATS_MB); `keep` (the file just
        written) stays. Returns the removed files."""
        max_files = MAX_DISK_STATS if max_files is None else max_files
        max_bytes = (MAX_DISK_STATS_MB if max_mb is None else max_mb) * 2**20
        entries = []
        for path in (self.cache_dir / "stats").glob("*.safetensors"):
            try:
                status = path.stat()
            except OSError:  # removed meanwhile by another process
                continue
            entries.append((status.st_mtime, status.st_size, path))
        entries.sort(key=lambda entry: entry[0])  # least recently used first
        count, total = len(entries), sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in entries:
            if count <= max_files and total <= max_bytes:
                break
            if keep is not None and path == keep:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as error:
                log.warning("could not remove cache entry %s: %s", path, error)
                continue
            count, total = count - 1, total - size
            removed.append(path)
        return removed

    # -- the quantized network belonging to a set of statistics

    def quantized_network(self, model: DiffusionModel, stats: NoiseStatistics) -> nn.Module:
        key = stats.config.key()
        with self._lock_for("q:" + key):
            network = self._quantized.get(key)
            if network is None:
                network = quantize_network(model.network, stats.quantizer).to(self.device)
                self._quantized[key] = network
            return network

    def efficiency(self, model: DiffusionModel, stats: NoiseStatistics) -> Efficiency:
        with self._lock_for("macs:" + model.identity):
            macs = self._macs.get(model.identity)
            if macs is None:
                x = torch.zeros((1, *model.sample_shape), device=self.device)
                labels = torch.zeros(1, dtype=torch.long, device=self.device) if model.conditional else None
                predictor = NoisePredictor(model.network, model.num_classes)
                macs = count_macs(model.network, lambda: predictor(x, 0, labels, 1.0))
                self._macs[model.identity] = macs
        return efficiency(model.network, macs, stats.quantizer.bits, batch=1)

    # -- the comparison

    def iter_compare(self, config: CompareConfig, progress: ProgressCallback | None = None, allow_calibration: bool = True,
                     should_stop: Callable[[], bool] | None = None, public: bool = False) -> Iterator[CompareProgress | ComparisonResult]:
        """Yield a `CompareProgress` after every step, then the `ComparisonResult`.

        `allow_calibration=False` refuses (ConfigError) rather than calibrate; `should_stop` is asked
        between sampling steps and raises `Cancelled` when it answers True (a progress callback may
        raise `Cancelled` itself to stop a calibration between its steps)."""
        model = self.model(config.model, public=public)
        config = config.validated(model)
        stats, source = self.statistics(model, config.stats_config(model), config.stats_path, progress, allow_calibration)
        predictors = {
            "fp": NoisePredictor(model.network, model.num_classes),
            "q": NoisePredictor(self.quantized_network(model, stats), model.num_classes),
        }
        schedule = DDIMSchedule(model.scheduler_config, config.steps, config.eta)
        tracks = [Track(name, METHODS[name].network, make_correction(name, stats, config.granularity)) for name in config.methods]
        noise = SamplerNoise.draw(config.num_images, model.sample_shape, config.steps, config.seed, self.device)
        labels = self.image_labels(model, config)
        labels = labels.to(self.device) if labels is not None else None

        records = []
        for step_records in sample(schedule, predictors, tracks, noise, labels, config.guidance):
            if should_stop is not None and should_stop():
                raise Cancelled("stopped")
            records.append(step_records)
            yield CompareProgress(len(records), len(schedule), {name: r.x0 for name, r in step_records.items()})
        yield self._result(config, model, labels, records, stats, source, schedule)

    def compare(self, config: CompareConfig, progress: ProgressCallback | None = None,
                on_step: Callable[[CompareProgress], None] | None = None) -> ComparisonResult:
        for event in self.iter_compare(config, progress):
            if isinstance(event, ComparisonResult):
                return event
            if on_step is not None:
                on_step(event)
        raise RuntimeError("the comparison ended without a result")

    @staticmethod
    def image_labels(model: DiffusionModel, config: CompareConfig) -> torch.Tensor | None:
        """The class of each image of a comparison (None for an unconditional model)."""
        if not model.conditional:
            return None
        if config.class_label is not None:
            return torch.full((config.num_images,), config.class_label, dtype=torch.long)
        return torch.arange(config.num_images) % model.num_classes

    def _result(self, config, model, labels, records, stats, source, schedule) -> ComparisonResult:
        samples = {name: record.x_prev for name, record in records[-1].items()}
        eff = self.efficiency(model, stats)
        metric_rows, image_rows = [], []
        for name, final in samples.items():
            mse, psnr = per_image_errors(final, samples["fp"], model.kind)
            is_fp = METHODS[name].network == "fp"
            metric_rows.append(
                {
                    "method": name,
                    "label": METHODS[name].label,
                    "bits": "W32A32" if is_fp else f"W{config.w_bits}A{config.a_bits}",
                    "mse_to_fp": float(mse.mean()),
                    "psnr_to_fp": float(psnr.mean()) if name != "fp" else float("inf"),
                    "psnr_std": float(psnr.std()) if name != "fp" and len(psnr) > 1 else 0.0,
                    "size_mb": eff.fp_size_mb if is_fp else eff.q_size_mb,
                    "gbops": eff.fp_gbops if is_fp else eff.q_gbops,
                    "compression": 1.0 if is_fp else eff.compression,
                    "bop_ratio": 1.0 if is_fp else eff.bop_ratio,
                }
            )
            for index in range(final.shape[0]):
                image_rows.append({"method": name, "image": index, "mse_to_fp": float(mse[index]), "psnr_to_fp": float(psnr[index])})
        return ComparisonResult(
            config=config,
            model=model,
            labels=labels,
            samples=samples,
            records=records,
            trajectory=trajectory_table(records),
            metrics=pd.DataFrame(metric_rows),
            per_image=pd.DataFrame(image_rows),
            stats=stats,
            stats_table=stats.table(schedule, config.granularity),
            efficiency=eff,
            stats_source=source,
        )


_default_workbench: Workbench | None = None
_default_lock = threading.Lock()


def default_workbench() -> Workbench:
    """The process-wide workbench both UIs and the CLI share."""
    global _default_workbench
    with _default_lock:
        if _default_workbench is None:
            _default_workbench = Workbench()
        return _default_workbench


def compute_statistics(config: CompareConfig, progress: ProgressCallback | None = None) -> tuple[DiffusionModel, NoiseStatistics]:
    """Calibrate (never from a cache) the statistics of `config`: what `d2dpm stats` writes."""
    workbench = default_workbench()
    model = workbench.model(config.model)
    config = config.validated(model)
    return model, calibrate(model, config.stats_config(model), workbench.device, progress).stats
