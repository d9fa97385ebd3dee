"""`d2dpm bench`: speed and memory figures of one run, printed as one JSON object.

Every time is the median of `--repeats` runs after `--warmup` unmeasured ones:

- forward: one guided noise prediction (FP vs quantized network) on the batch a default
  comparison runs (one image per class: 9 for emoji), and their ratio; with --against, the FP
  forward of a second model (the network a new one replaces) timed in alternation, and the ratio;
- sampler_step: one DDIM step driven by the quantized network with no correction vs with each
  correction (the correction's overhead ratio), and the correction alone;
- compare: one full `Workbench.compare` of fp, q, ptqd, s-d2, d-d2 (the default images, 20 steps);
- calibration: calibrating one configuration's quantizer and noise statistics;
- app_cold_start: `python app.py` on a free 127.0.0.1 port, process start to first answered HTTP
  request (skipped, with a note, when app.py is absent);
- peak_rss_mb: peak resident memory of this process;
- gpu (CUDA only): images/s of the FP and the quantized sampler at batch 256, for the model and
  for a UNet2DModel with the configuration of google/ddpm-cifar10-32 (random weights).

Figures are measured, never asserted: the targets of issue 5 are printed beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import torch

from ..config import BACKBONES, DEFAULT_BACKBONE, DEFAULT_CALIB_SAMPLES, DEFAULT_METHODS, CompareConfig
from ..errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
CORRECTIONS = ("ptqd", "s-d2", "d-d2", "mean-only", "var-only")
TARGETS = {
    "forward_ratio_max": 1.5,
    "correction_overhead_ratio_max": 1.05,
    "compare_seconds_max": 5.0,
    "calibration_seconds_max": 60.0,
    "app_cold_start_seconds_max": 15.0,
    "gpu_quantized_over_fp_throughput_min": 0.5,
}
# google/ddpm-cifar10-32's UNet2DModel configuration (35.7M parameters); weights are random here.
DDPM_CIFAR10_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32,
    norm_eps=1e-6,
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    time_embedding_type="positional",
)


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, warmup: int, device: str = "cpu") -> dict:
    """Median (and min, max) seconds of `repeats` calls after `warmup` unmeasured ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    # cpu_s: this process's CPU time (all its threads), less sensitive than wall time to other
    # processes competing for the cores.
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "cpu_s": statistics.median(cpu_times), "repeats": repeats}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: str = "cpu") -> dict[str, list[float]]:
    """Seconds of each call over `repeats` rounds that call every function once, in turn: drift in
    the machine's load then hits every function alike, so their ratios hold on a noisy machine."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    rounds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            rounds[name].append(time.perf_counter() - start)
    return rounds


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


STAYS_UP_SECONDS = 3.0


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `grace` seconds."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def app_cold_start(timeout: float = 120.0, python: str = sys.executable, app: Path | None = None) -> dict:
    """Start `python app.py` on a free local port; seconds until the first HTTP answer.

    The port is passed as GRADIO_SERVER_PORT (and PORT), the address as GRADIO_SERVER_NAME."""
    app = Path(app) if app is not None else REPO_ROOT / "app.py"
    if not app.is_file():
        return {"seconds": None, "note": "app.py is absent: cold start not measured"}
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), PORT=str(port), HF_HUB_OFFLINE="1")
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty app can never block on it
    start = time.perf_counter()
    process = subprocess.Popen([python, str(app)], cwd=str(app.parent), env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    def log_tail() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-400:].strip()

    try:
        while time.perf_counter() - start < timeout:
            if process.poll() is not None:
                return {"seconds": None, "note": f"app.py exited with {process.returncode} before answering: {log_tail()}"}
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    status = response.status
            except urllib.error.HTTPError as error:  # an HTTP error is still an answer
                status = error.code
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.1)
                continue
            seconds = time.perf_counter() - start
            time.sleep(STAYS_UP_SECONDS)  # an app that answers once and then dies has not started
            if process.poll() is not None:
                return {"seconds": None, "note": f"app.py answered, then exited with {process.returncode}: {log_tail()}"}
            return {"seconds": seconds, "status": status, "port": port, "command": "python app.py"}
        return {"seconds": None, "note": f"no HTTP answer on port {port} within {timeout:.0f} s"}
    finally:
        stop_process(process)
        log.close()


def against_model(workbench, model, spec: str):
    """The model whose FP forward --against times beside `model`'s: same sample shape and conditioning
    (checked before any calibration, so a mismatch costs nothing)."""
    other = workbench.model(spec)
    if other.sample_shape != model.sample_shape or other.conditional != model.conditional:
        raise ConfigError("against", spec, f"a model with samples of shape {model.sample_shape} and the same conditioning")
    return other


def forward_against(model, other, x, labels, t: int, guidance: float, repeats: int, warmup: int, device: str) -> dict:
    """The FP forward of `model` beside another model's (a retrained or resized network) on the
    same guided batch, timed in alternation: the cost ratio a new embedded network adds."""
    from ..models import NoisePredictor

    networks = {"model": NoisePredictor(model.network, model.num_classes), "against": NoisePredictor(other.network, other.num_classes)}
    _log(f"FP forward of {model.name} against {other.name}")
    with torch.no_grad():
        rounds = interleaved({name: (lambda p=p: p(x, t, labels, guidance)) for name, p in networks.items()}, repeats * 4, warmup, device)
    model_s, against_s = statistics.median(rounds["model"]), statistics.median(rounds["against"])
    return {"model": other.name, "fp_s": against_s, "parameters": sum(p.numel() for p in other.network.parameters()),
            "model_parameters": sum(p.numel() for p in model.network.parameters()), "ratio_model_over_against": model_s / against_s}


def _model_folder_ddpm_cifar10(folder: Path) -> Path:
    """A d2dpm model folder with a randomly initialised UNet2DModel of ddpm-cifar10-32's configuration."""
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(**DDPM_CIFAR10_CONFIG).save_pretrained(folder / "unet")
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).save_pretrained(folder / "scheduler")
    meta = {"name": "ddpm-cifar10-32-config-random", "kind": "image", "network_class": "UNet2DModel", "network_subfolder": "unet",
            "sample_shape": [3, 32, 32], "num_classes": None}
    (folder / "d2dpm_model.json").write_text(json.dumps(meta))
    return folder


def sampler_throughput(workbench, model_spec: str, batch: int, steps: int, guidance, repeats: int, warmup: int, calib_samples: int) -> dict:
    """Images/s of the FP-only and the quantized-only DDIM sampler at `batch`."""
    from ..corrections import Correction
    from ..models import NoisePredictor
    from ..sampler import SamplerNoise, Track, sample
    from ..schedule import DDIMSchedule

    model = workbench.model(model_spec)
    config = CompareConfig(model=model_spec, steps=steps, guidance=guidance, calib_samples=calib_samples).validated(model)
    stats, _ = workbench.statistics(model, config.stats_config(model))
    predictors = {"fp": NoisePredictor(model.network, model.num_classes),
                  "q": NoisePredictor(workbench.quantized_network(model, stats), model.num_classes)}
    schedule = DDIMSchedule(model.scheduler_config, steps, config.eta)
    noise = SamplerNoise.draw(batch, model.sample_shape, steps, 0, workbench.device)
    labels = (torch.arange(batch) % model.num_classes).to(workbench.device) if model.conditional else None
    out = {"batch": batch, "steps": steps, "guidance": config.guidance, "w_bits": config.w_bits, "a_bits": config.a_bits}
    for network in ("fp", "q"):
        def run():
            for _ in sample(schedule, predictors, [Track(network, network, Correction())], noise, labels, config.guidance):
                pass

        timing = timed(run, repeats, warmup, workbench.device)
        out[f"{network}_images_per_s"] = batch / timing["median_s"]
        out[f"{network}_seconds"] = timing["median_s"]
    out["q_over_fp_throughput"] = out["q_images_per_s"] / out["fp_images_per_s"]
    return out


def _figure_arguments(argv: list[str]) -> list[str]:
    """The command-line arguments that shape the figures (output paths left out)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--out", "--markdown"):
            skip = True
        elif not arg.startswith(("--out=", "--markdown=")):
            kept.append(arg)
    return kept


def run_bench(args: argparse.Namespace) -> dict:
    from ..calibration import calibrate
    from ..corrections import Correction, make_correction
    from ..experiment import Workbench
    from ..models import NoisePredictor
    from ..schedule import DDIMSchedule

    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(args.threads)
        except RuntimeError:  # only settable before the first parallel work of the process
            pass
    repeats, warmup = args.repeats, args.warmup
    calib_samples = args.calib_samples
    cache = tempfile.TemporaryDirectory(prefix="d2dpm-bench-")
    workbench = Workbench(cache_dir=Path(cache.name), device=args.device)
    device = workbench.device
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["d2dpm", *_figure_arguments(args.argv)]) if getattr(args, "argv", None) else None,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1m_at_start": os.getloadavg()[0],  # other processes on the machine skew CPU figures
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": args.model,
        "quick": bool(args.quick),
        "repeats": repeats,
        "warmup": warmup,
        "targets": TARGETS,
    }

    _log(f"loading {args.model} on {device}")
    started = time.perf_counter()
    model = workbench.model(args.model)
    base = CompareConfig(model=args.model, w_bits=args.w_bits, a_bits=args.a_bits, steps=args.steps, eta=1.0,
                         methods=DEFAULT_METHODS, num_images=args.images, calib_samples=calib_samples).validated(model)
    images = base.num_images
    other = against_model(workbench, model, args.against) if args.against else None
    report["model_load_s"] = time.perf_counter() - started

    # Calibration of every backbone (from an empty cache). The app calibrates rtn and bias-correction
    # on demand, so they have the target; AdaRound ships precomputed and is timed once. The last
    # calibration of the default backbone serves everything that follows.
    report["calibration"] = {}
    for backbone in sorted(BACKBONES, key=lambda name: name == DEFAULT_BACKBONE):
        _log(f"calibrating {backbone} W{base.w_bits}A{base.a_bits}, {base.steps} steps, {calib_samples} trajectories")
        stats_config = dataclasses.replace(base, backbone=backbone).stats_config(model)
        results = []
        calibration = timed(lambda: results.append(calibrate(model, stats_config, device)), 1 if backbone == "adaround" else args.calib_repeats,
                            0, device)
        report["calibration"][backbone] = {**calibration, "calib_samples": calib_samples, "w_bits": base.w_bits, "a_bits": base.a_bits,
                                           "steps": base.steps, "eta": base.eta, "guidance": base.guidance,
                                           "meets_target": None if backbone == "adaround"
                                           else calibration["median_s"] <= TARGETS["calibration_seconds_max"]}
    workbench.add_statistics(results[-1].stats)
    stats, _ = workbench.statistics(model, stats_config)

    # Forward: FP vs quantized, the batch of one comparison step (the images per network; ×2 with guidance).
    fp = NoisePredictor(model.network, model.num_classes)
    q = NoisePredictor(workbench.quantized_network(model, stats), model.num_classes)
    schedule = DDIMSchedule(model.scheduler_config, base.steps, base.eta)
    coeff = schedule.steps[len(schedule) // 2]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((images, *model.sample_shape), generator=generator).to(device)
    labels = (torch.arange(images) % model.num_classes).to(device) if model.conditional else None
    _log("forward FP vs quantized")
    t_fp = timed(lambda: fp(x, coeff.t, labels, base.guidance), repeats * 2, warmup, device)
    t_q = timed(lambda: q(x, coeff.t, labels, base.guidance), repeats * 2, warmup, device)
    report["forward"] = {"batch": images, "guidance": base.guidance, "fp_s": t_fp["median_s"], "q_s": t_q["median_s"],
                         "fp_cpu_s": t_fp["cpu_s"], "q_cpu_s": t_q["cpu_s"],
                         "ratio_q_over_fp": t_q["median_s"] / t_fp["median_s"],
                         "meets_target": t_q["median_s"] / t_fp["median_s"] <= TARGETS["forward_ratio_max"]}
    if other is not None:
        report["forward"]["against"] = forward_against(model, other, x, labels, coeff.t, base.guidance, repeats, warmup, device)

    # One sampler step: quantized forward + correction + DDIM update (η = 1, so every branch runs).
    _log("sampler step with each correction")
    z = torch.randn(x.shape, generator=generator).to(device)
    extra = torch.randn(x.shape, generator=generator).to(device)
    eps_hat = q(x, coeff.t, labels, base.guidance)
    corrections = {"none": Correction(), **{name: make_correction(name, stats, base.granularity) for name in CORRECTIONS}}

    def step_with(correction):
        def run():
            e = q(x, coeff.t, labels, base.guidance)
            out = correction(e, coeff, extra_noise=extra)
            schedule.step(x, out.eps, coeff, out.sigma, z)
        return run

    def correction_only(correction):
        def run():
            for _ in range(10):
                correction(eps_hat, coeff, extra_noise=extra)
        return run

    rounds = interleaved({name: step_with(correction) for name, correction in corrections.items()}, repeats * 2, warmup, device)
    step_none = statistics.median(rounds["none"])
    steps_report = {"q_step_s": step_none, "eta": base.eta, "t": coeff.t, "corrections": {}}
    for name in CORRECTIONS:
        alone = timed(correction_only(corrections[name]), repeats, warmup, device)["median_s"] / 10
        step = statistics.median(rounds[name])
        steps_report["corrections"][name] = {
            "step_s": step,
            "overhead_ratio": step / step_none,
            "correction_only_s": alone,
            "overhead_ratio_isolated": (step_none + alone) / step_none,
            "meets_target": (step_none + alone) / step_none <= TARGETS["correction_overhead_ratio_max"],
        }
    report["sampler_step"] = steps_report

    # One full comparison (statistics already in the workbench, as in a warm app).
    _log(f"compare {','.join(DEFAULT_METHODS)}: {images} images, {base.steps} steps")
    # η = 1 as calibrated above, so no second calibration; every branch of every correction runs.
    compare_config = CompareConfig(model=args.model, w_bits=base.w_bits, a_bits=base.a_bits, steps=base.steps, eta=base.eta,
                                   methods=DEFAULT_METHODS, num_images=images, calib_samples=calib_samples)
    t_compare = timed(lambda: workbench.compare(compare_config), max(1, repeats // 2 + 1), warmup, device)
    report["compare"] = {**t_compare, "methods": list(DEFAULT_METHODS), "images": images, "steps": base.steps, "eta": base.eta,
                         "meets_target": t_compare["median_s"] <= TARGETS["compare_seconds_max"]}

    # App cold start (its own process).
    if args.skip_app:
        report["app_cold_start"] = {"seconds": None, "note": "skipped (--skip-app)"}
    else:
        _log("app cold start")
        report["app_cold_start"] = app_cold_start(timeout=args.app_timeout)
        if report["app_cold_start"]["seconds"] is not None:
            report["app_cold_start"]["meets_target"] = report["app_cold_start"]["seconds"] <= TARGETS["app_cold_start_seconds_max"]

    # GPU throughput.
    if device.startswith("cuda") and not args.skip_gpu_throughput:
        gpu = {}
        _log("GPU throughput, batch 256")
        gpu[args.model] = sampler_throughput(workbench, args.model, args.gpu_batch, base.steps, None, repeats, 1, calib_samples)
        with tempfile.TemporaryDirectory(prefix="d2dpm-cifar-") as folder:
            spec = str(_model_folder_ddpm_cifar10(Path(folder)))
            gpu["ddpm-cifar10-32-config"] = sampler_throughput(workbench, spec, args.gpu_batch, base.steps, None, repeats, 1, min(calib_samples, 64))
            gpu["ddpm-cifar10-32-config"]["note"] = "UNet2DModel with google/ddpm-cifar10-32's configuration and random weights (timing only)"
        for figures in gpu.values():
            figures["meets_target"] = figures["q_over_fp_throughput"] >= TARGETS["gpu_quantized_over_fp_throughput_min"]
        report["gpu"] = gpu
    else:
        report["gpu"] = None if not device.startswith("cuda") else {"note": "skipped (--skip-gpu-throughput)"}

    report["load_average_1m_at_end"] = os.getloadavg()[0]
    report["peak_rss_mb"] = peak_rss_mb()
    report["total_s"] = time.perf_counter() - started
    cache.cleanup()
    return report


def markdown_summary(report: dict) -> str:
    """The figures of one report as a Markdown table, with the targets beside them."""

    def ms(seconds):
        return "–" if seconds is None else f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"

    def verdict(flag):
        return "" if flag is None else "meets" if flag else "**misses**"

    rows = [
        ("FP forward (guided, batch %d)" % report["forward"]["batch"], ms(report["forward"]["fp_s"]), "", ""),
        ("quantized forward", ms(report["forward"]["q_s"]), "", ""),
        ("quantized / FP forward", f"{report['forward']['ratio_q_over_fp']:.2f}×", "≤ 1.5×", verdict(report["forward"]["meets_target"])),
        ("quantized sampler step, no correction", ms(report["sampler_step"]["q_step_s"]), "", ""),
    ]
    for name, figures in report["sampler_step"]["corrections"].items():
        rows.append((f"step with {name}: ratio (interleaved) / isolated correction",
                     f"{figures['overhead_ratio']:.3f}× / {figures['overhead_ratio_isolated']:.4f}× ({ms(figures['correction_only_s'])})",
                     "≤ 1.05×", verdict(figures["meets_target"])))
    rows.insert(3, ("quantized / FP forward, process CPU time", f"{report['forward']['q_cpu_s'] / report['forward']['fp_cpu_s']:.2f}×", "", ""))
    against = report["forward"].get("against")
    if against:
        rows.insert(4, (f"FP forward against {against['model']} ({against['model_parameters']:,} vs {against['parameters']:,} parameters)",
                        f"{ms(against['fp_s'])}; ratio {against['ratio_model_over_against']:.2f}× (interleaved)", "", ""))
    compare = report["compare"]
    rows.append((f"compare {'+'.join(compare['methods'])}, {compare['images']} images, {compare['steps']} steps",
                 f"{ms(compare['median_s'])} (CPU time {ms(compare['cpu_s'])})", "< 5 s", verdict(compare["meets_target"])))
    for backbone, calib in report["calibration"].items():
        rows.append((f"calibration, {backbone} backbone, W{calib['w_bits']}A{calib['a_bits']}, {calib['calib_samples']} trajectories",
                     f"{ms(calib['median_s'])} (CPU time {ms(calib['cpu_s'])})", "shipped" if backbone == "adaround" else "< 60 s",
                     verdict(calib["meets_target"]) if calib["meets_target"] is not None else ""))
    app = report["app_cold_start"]
    rows.append(("app cold start (python app.py → first HTTP answer)", ms(app.get("seconds")) if app.get("seconds") else app.get("note", "–"),
                 "< 15 s", verdict(app.get("meets_target"))))
    rows.append(("peak resident memory", f"{report['peak_rss_mb']:.0f} MB", "", ""))
    for model, figures in (report.get("gpu") or {}).items():
        if not isinstance(figures, dict) or "fp_images_per_s" not in figures:
            continue
        rows.append((f"GPU {model}, batch {figures['batch']}, {figures['steps']} steps: FP / quantized sampler",
                     f"{figures['fp_images_per_s']:.0f} / {figures['q_images_per_s']:.0f} images/s "
                     f"(ratio {figures['q_over_fp_throughput']:.2f})", "ratio ≥ 0.5", verdict(figures["meets_target"])))
    lines = ["| figure | measured | target | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def _resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    quick = bool(args.quick)
    args.repeats = args.repeats or (2 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.calib_samples = args.calib_samples or (4 if quick else DEFAULT_CALIB_SAMPLES)
    args.calib_repeats = args.calib_repeats or 1
    return args


def run_bench_command(args: argparse.Namespace) -> int:
    report = run_bench(_resolve_defaults(args))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown_summary(report) + "\n")
    print(text)
    return 0
