"""`d2dpm train`: train an embedded model (DDPM ε-prediction) and save it in d2dpm's model folder.

    d2dpm train --dataset toy2d --out out/toy2d

The folder holds d2dpm_model.json, the EMA weights (unet/ or network/, safetensors), the DDIM
scheduler config, training_log.csv, and checkpoint/training_state.pt (raw weights, optimizer,
step) so that `--resume` can continue a run that a time limit cut short. `--init-from` starts a
new run from a model's weights instead: one more training cycle, to see whether it had converged.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import shlex
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel

from ..errors import ConfigError
from ..models import DEFAULT_SCHEDULER_CONFIG
from ..toy import ToyEpsMLP, sample_toy2d
from .arguments import TRAIN_DEFAULTS, add_train_arguments
from .datasets import load_emoji32, load_fashion_mnist

WARMUP_STEPS = 500
GRAD_CLIP = 1.0
TOY_INPUT_FREQUENCIES = 6  # Fourier features 2^0..2^5 of the toy point: resolve the ring and spiral widths (~0.07)
TOY_HIDDEN_SIZE = 128  # 4 SiLU layers of 128: trains in under a minute on 2 CPU cores, ε-MSE within 0.0004 of 256 wide
ATTENTION_HEAD_DIM = 32
LOG_EVERY = 100
EVAL_SIZE = 2048  # fixed (x0, t, noise) triples on which the final EMA loss is measured
CHECKPOINT_FILE = Path("checkpoint") / "training_state.pt"
LOG_FILE = "training_log.csv"
LOG_COLUMNS = ["step", "loss", "lr", "seconds"]


def image_unet(image_channels: int, num_classes: int, block_channels: tuple[int, ...]) -> UNet2DModel:
    """The embedded image network, sized for the demo on 2 CPU cores: 16 channels at 32×32,
    attention only at 8×8 and in the 4×4 middle. Width is cheap at the coarse levels (16,32,96,128
    has 2.8× the parameters of 16,32,64,64 for 1.2× its CPU time) and dear at the fine ones
    (32,64,64,64: 1.8×). Class index `num_classes` is the null class of classifier-free guidance."""
    return UNet2DModel(
        sample_size=32,
        in_channels=image_channels,
        out_channels=image_channels,
        block_out_channels=block_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=ATTENTION_HEAD_DIM,
        norm_num_groups=8,
        num_class_embeds=num_classes + 1,
    )


@dataclass
class TrainingData:
    """Where clean samples x0 come from, and what the saved model says about them."""

    name: str
    kind: str  # "image" or "points"
    sample_shape: list[int]
    images: torch.Tensor | None = None  # the whole image set, on the training device
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    horizontal_flip: bool = False
    balance_classes: bool = False  # draw every class equally often, not every image

    def __post_init__(self):
        # Drawing image i with probability ∝ 1/(size of its class) makes every class equally likely.
        self.draw_weights = None
        if self.images is not None and self.balance_classes:
            counts = torch.bincount(self.labels, minlength=self.num_classes).float()
            self.draw_weights = 1.0 / counts[self.labels]

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names else None

    def batch(self, size: int, generator: torch.Generator, toy_generator: torch.Generator, device: torch.device):
        if self.images is None:
            return sample_toy2d(size, toy_generator).to(device), None
        if self.draw_weights is None:
            index = torch.randint(len(self.images), (size,), device=device, generator=generator)
        else:
            index = torch.multinomial(self.draw_weights, size, replacement=True, generator=generator)
        x0, labels = self.images[index], self.labels[index]
        if self.horizontal_flip:
            flip = torch.rand(size, device=device, generator=generator) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        return x0, labels


def load_training_data(dataset: str, device: torch.device, balance_classes: bool = False) -> TrainingData:
    if dataset == "toy2d":
        return TrainingData("toy2d", "points", [2])
    if dataset == "emoji":
        # No flips: emoji hold text (🆗, flags) and direction (🏃 faces left, ➡️) that a mirror breaks.
        images, labels, class_names = load_emoji32()
        flip = False
    else:
        images, labels, class_names = load_fashion_mnist("train")
        flip = True  # clothes are left-right symmetric up to detail
    return TrainingData(dataset, "image", list(images.shape[1:]), images.to(device), labels.to(device), class_names, flip,
                        balance_classes)


def build_network(data: TrainingData, block_channels: tuple[int, ...] | None) -> torch.nn.Module:
    if data.kind == "points":
        return ToyEpsMLP(hidden_size=TOY_HIDDEN_SIZE, input_frequencies=TOY_INPUT_FREQUENCIES)
    return image_unet(data.sample_shape[0], data.num_classes, block_channels)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def command_line(args: argparse.Namespace) -> str:
    """The `d2dpm train` command that reproduces this run, every setting spelled out."""
    parts = ["d2dpm", "train", "--dataset", args.dataset, "--out", str(args.out), "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--cooldown-steps", str(args.cooldown_steps),
             "--seed", str(args.seed),
             "--ema-decay", str(args.ema_decay), "--label-dropout", str(args.label_dropout), "--device", args.device]
    if args.dataset != "toy2d":
        parts += ["--channels", args.channels, "--balance-classes" if args.balance_classes else "--no-balance-classes"]
    if args.resume:
        parts += ["--resume", str(args.resume)]
    if args.init_from:
        parts += ["--init-from", str(args.init_from)]
    if args.max_minutes:
        parts += ["--max-minutes", str(args.max_minutes)]
    if not args.cuda_graph:
        parts += ["--no-cuda-graph"]
    return shlex.join(parts)


def learning_rate(args: argparse.Namespace, step: int, remaining: int) -> float:
    """Warm-up, constant, then a cosine cool-down to 0 when `remaining` steps reach 0. A constant
    rate leaves the weights jittering, and sampling is sensitive to the small ε errors at high noise
    that this leaves."""
    rate = args.lr * min(1.0, (step + 1) / WARMUP_STEPS)
    remaining = max(remaining, 0)
    if remaining < args.cooldown_steps:
        rate *= 0.5 * (1 + math.cos(math.pi * (1 - remaining / args.cooldown_steps)))
    return rate


def _fill_defaults(args: argparse.Namespace) -> None:
    for key, value in TRAIN_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def block_channels(args: argparse.Namespace) -> tuple[int, ...] | None:
    if args.dataset == "toy2d":
        return None
    try:
        channels = tuple(int(part) for part in args.channels.split(","))
    except ValueError:
        channels = ()
    # Group norm has 8 groups; levels 3 and 4 (attention, heads of ATTENTION_HEAD_DIM) need whole heads.
    if len(channels) != 4 or min(channels) < 8 or any(c % 8 for c in channels) or any(c % ATTENTION_HEAD_DIM for c in channels[2:]):
        raise ConfigError("channels", args.channels, f"4 comma-separated multiples of 8, the last two multiples of "
                          f"{ATTENTION_HEAD_DIM} (attention heads)")
    return channels


def steps_left(args: argparse.Namespace, step: int, first_step: int, elapsed: float) -> int:
    """Steps until the run ends: at --steps, or at --max-minutes if that comes first, judged by
    the pace of this run so far."""
    left = args.steps - step
    if args.max_minutes and step > first_step and elapsed > 0:
        left = min(left, int((args.max_minutes * 60 - elapsed) * (step - first_step) / elapsed))
    return left


class WeightAverage:
    """The exponential moving average of the weights that is saved: w̄ ← w̄ + (1 − d)(w − w̄), with
    the usual warm-up d = min(decay, (1 + n)/(10 + n)) after n updates, so the random initial
    weights are forgotten within the first hundred steps rather than weighing decay^n (19 % after
    3 000 steps at 0.9995). One fused `_foreach_lerp_` over all parameters, run after each step."""

    def __init__(self, network: torch.nn.Module, decay: float, updates: int = 0):
        self.module = copy.deepcopy(network).requires_grad_(False)
        self.decay, self.updates = decay, updates
        self._averaged = list(self.module.parameters())
        self._live = list(network.parameters())

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._averaged, self._live, 1.0 - decay)
        self.updates += 1


class TrainingStep:
    """One optimizer step on a batch held in fixed tensors: forward, ε-MSE, backward, gradient
    clipping, AdamW; then the weight average (outside the graph: its decay changes while it warms up).

    On CUDA the step is captured once as a CUDA graph and replayed: the embedded networks are so
    small that launching their ~1000 kernels one by one, not the arithmetic, bounds the speed.
    Everything a replay reads changes in place: the batch tensors (`load`) and the learning rate
    (a tensor, `set_lr`). Elsewhere (CPU, or if capture fails) the same function runs eagerly.
    """

    def __init__(self, network, average: WeightAverage, optimizer, batch_shape, conditional: bool, device: torch.device,
                 channels_last: bool, use_graph: bool = True):
        self.network, self.average, self.optimizer, self.use_graph = network, average, optimizer, use_graph
        self.parameters = list(network.parameters())
        self.device, self.channels_last = device, channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.noisy = torch.zeros(batch_shape, device=device).contiguous(memory_format=memory_format)
        self.noise = torch.zeros(batch_shape, device=device)
        self.timesteps = torch.zeros(batch_shape[0], dtype=torch.long, device=device)
        self.labels = torch.zeros(batch_shape[0], dtype=torch.long, device=device) if conditional else None
        # bf16 matmuls and convolutions on CUDA; the loss stays float32. The cast cache must be off in a graph.
        self.autocast = device.type == "cuda"
        self.graph = None
        self.loss = None

    def load(self, noisy, noise, timesteps, labels) -> None:
        self.noisy.copy_(noisy)
        self.noise.copy_(noise)
        self.timesteps.copy_(timesteps)
        if self.labels is not None:
            self.labels.copy_(labels)

    def set_lr(self, rate: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # in place: the captured graph reads this tensor
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate

    def _step(self) -> torch.Tensor:
        kwargs = {} if self.labels is None else {"class_labels": self.labels}
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False) if self.autocast else nullcontext()
        with autocast:
            eps = self.network(self.noisy, self.timesteps, **kwargs).sample
        loss = F.mse_loss(eps.float(), self.noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, GRAD_CLIP, foreach=self.device.type == "cuda")
        self.optimizer.step()
        return loss

    def run(self) -> torch.Tensor:
        """One step on the loaded batch; returns the loss (a tensor, not synchronised)."""
        if self.graph is not None:
            self.graph.replay()
            loss = self.loss
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._step().detach()
        self.average.update()
        return loss

    def capture(self, report) -> None:
        """Record the step as a CUDA graph (after the eager steps that warmed up cuDNN and the
        optimizer state). Gradients are set to None first, so the graph's backward owns them."""
        if self.device.type != "cuda" or not self.use_graph:
            return
        try:
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                self.loss = self._step().detach()
            self.graph = graph
            report("training step captured as a CUDA graph")
        except RuntimeError as error:  # unsupported op in capture: stay eager
            self.graph, self.loss = None, None
            self.optimizer.zero_grad(set_to_none=True)
            report(f"CUDA graph capture failed ({error}); training eagerly")


EAGER_STEPS_BEFORE_CAPTURE = 5  # on a side stream, as CUDA graph capture requires warmed-up state


@torch.no_grad()
def evaluation_loss(network: torch.nn.Module, data: TrainingData, scheduler: DDIMScheduler, device: torch.device) -> float:
    """ε-MSE of `network` in float32 on a fixed set of (x0, t, noise); labels are the true classes."""
    generator = torch.Generator().manual_seed(1234)
    if data.images is None:
        x0, labels = sample_toy2d(EVAL_SIZE * 4, generator), None
    else:
        index = torch.randperm(len(data.images), generator=generator)[:EVAL_SIZE].to(device)
        x0, labels = data.images[index].cpu(), data.labels[index]
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    total = 0.0
    for start in range(0, len(x0), 512):
        part = slice(start, start + 512)
        kwargs = {} if labels is None else {"class_labels": labels[part]}
        eps = network(noisy[part].to(device), timesteps[part].to(device), **kwargs).sample
        total += F.mse_loss(eps.float(), noise[part].to(device), reduction="sum").item()
    return total / noise.numel()


def _save(out: Path, data: TrainingData, network, ema: WeightAverage, optimizer, step: int, training: dict,
          log_rows: list[dict]) -> None:
    subfolder = "unet" if data.kind == "image" else "network"
    # safetensors stores contiguous tensors only: save a standard-layout copy of the EMA weights.
    copy.deepcopy(ema.module).to(memory_format=torch.contiguous_format).save_pretrained(out / subfolder, safe_serialization=True)
    DDIMScheduler(**DEFAULT_SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    meta = {
        "name": data.name,
        "kind": data.kind,
        "network_class": type(network).__name__,
        "network_subfolder": subfolder,
        "sample_shape": data.sample_shape,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "null_class": data.num_classes,
        "training": training,
    }
    (out / "d2dpm_model.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    with open(out / LOG_FILE, "w", newline="") as file:
        writer = csv.DictWriter(file, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(log_rows)
    # The EMA weights are the ones in `subfolder`; the checkpoint adds what resuming needs.
    (out / CHECKPOINT_FILE).parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "network": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "training": training,
    }
    torch.save(state, out / (str(CHECKPOINT_FILE) + ".tmp"))
    (out / (str(CHECKPOINT_FILE) + ".tmp")).replace(out / CHECKPOINT_FILE)


def _start_from_weights(folder: Path, subfolder: str, data: TrainingData, network: torch.nn.Module, ema: WeightAverage) -> dict:
    """--init-from: a new run (step 0, fresh optimizer, learning-rate warm-up) whose raw and averaged
    weights both start as `folder`'s saved (averaged) weights: one more training cycle for a model,
    to see whether it had converged. Returns what the new model records about where it started: the
    folder and that model's whole training record, which nests its own start, so the lineage of a model
    trained in several cycles stays complete."""
    allowed = f"a model folder of {data.name} with the same architecture (its {subfolder}/ weights must fit this network)"
    try:
        weights = type(network).from_pretrained(folder / subfolder, low_cpu_mem_usage=False).state_dict()
        network.load_state_dict(weights)
    except (OSError, RuntimeError, ValueError):  # no such folder / not a model / other shapes
        raise ConfigError("init-from", str(folder), allowed) from None
    ema.module.load_state_dict(weights)
    try:
        earlier = json.loads((folder / "d2dpm_model.json").read_text())["training"]
    except (OSError, ValueError, KeyError):
        earlier = {}
    return {"folder": str(folder), **earlier}


def run_train(args: argparse.Namespace) -> Path:
    """Train as `args` say and write the model folder; returns its path."""
    _fill_defaults(args)
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convolutions
    torch.manual_seed(args.seed)
    channels = block_channels(args)  # refuse a bad --channels before loading any data
    if args.resume and args.init_from:
        raise ConfigError("init-from", str(args.init_from), "not together with --resume (which continues a run; "
                          "--init-from starts a new one from a model's weights)")
    data = load_training_data(args.dataset, device, bool(args.balance_classes))
    network = build_network(data, channels).to(device).train()
    # Channels-last (NHWC) is the layout of cuDNN's tensor-core convolutions; not A/B-timed here.
    channels_last = device.type == "cuda" and data.kind == "image"
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    on_cuda = device.type == "cuda"
    # A tensor learning rate can change between CUDA graph replays; capturable keeps Adam's step count on the GPU.
    lr = torch.tensor(float(args.lr), device=device) if on_cuda else float(args.lr)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=0.0, capturable=on_cuda, foreach=on_cuda)
    scheduler = DDIMScheduler(**DEFAULT_SCHEDULER_CONFIG)
    generator = torch.Generator(device).manual_seed(args.seed)
    toy_generator = torch.Generator().manual_seed(args.seed)
    null_class = data.num_classes

    step, earlier_seconds, earlier_commands, log_rows = 0, 0.0, [], []
    if args.resume:
        state = torch.load(args.resume / CHECKPOINT_FILE, map_location=device, weights_only=True)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # loading replaces the group's lr by the saved float
            group["lr"] = lr
        step = state["step"]
        # Reseed rather than restore: a checkpoint may move between CUDA and CPU, whose generators differ.
        generator.manual_seed(args.seed + step)
        toy_generator.manual_seed(args.seed + step)
        earlier_seconds = state["training"]["seconds"]
        earlier_commands = state["training"].get("earlier_commands", []) + [state["training"]["command"]]
        with open(args.resume / LOG_FILE, newline="") as file:
            log_rows = list(csv.DictReader(file))
    ema = WeightAverage(network, args.ema_decay, updates=step)
    subfolder = "unet" if data.kind == "image" else "network"
    if args.resume:
        ema.module.load_state_dict(type(network).from_pretrained(args.resume / subfolder, low_cpu_mem_usage=False).state_dict())
    initialised_from = _start_from_weights(args.init_from, subfolder, data, network, ema) if args.init_from else None

    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.log, "a") if args.log else None

    def report(line: str) -> None:
        print(line, flush=True)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    command = command_line(args)
    report(f"{command}\n{data.name}: {sum(p.numel() for p in network.parameters()):,} parameters on {device}, "
           f"from step {step} to {args.steps}")
    batch_shape = (args.batch_size, *data.sample_shape)
    training_step = TrainingStep(network, ema, optimizer, batch_shape, data.num_classes is not None, device, channels_last,
                                 args.cuda_graph)
    started, interval_losses = time.perf_counter(), []

    def training_record(final_ema_loss: float | None, seconds: float) -> dict:
        record = {
            "command": command,
            "steps": step,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "cooldown_steps": args.cooldown_steps,
            "ema_decay": args.ema_decay,
            "label_dropout": args.label_dropout if data.num_classes else None,
            "horizontal_flip": data.horizontal_flip,
            "balance_classes": data.balance_classes,
            "seed": args.seed,
            "final_ema_loss": final_ema_loss,
            "final_ema_loss_on": f"ε-MSE in float32 on {EVAL_SIZE if data.images is not None else EVAL_SIZE * 4} "
                                 "fixed (x0, t, noise) triples of the training data",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "seconds": round(seconds, 1),  # training only, all runs of a resumed model together
        }
        if earlier_commands:
            record["earlier_commands"] = earlier_commands
        if initialised_from:
            record["initialised_from"] = initialised_from
        return record

    first_step = step
    # CUDA graph capture wants the warm-up steps on a side stream (cuDNN autotuning, optimizer state).
    side_stream = torch.cuda.Stream(device) if on_cuda else None
    with torch.cuda.stream(side_stream) if on_cuda else nullcontext():
        while step < args.steps:
            x0, labels = data.batch(args.batch_size, generator, toy_generator, device)
            noise = torch.randn(x0.shape, device=device, generator=generator)
            timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), device=device, generator=generator)
            if labels is not None:
                dropped = torch.rand(len(labels), device=device, generator=generator) < args.label_dropout
                labels = torch.where(dropped, null_class, labels)
            training_step.load(scheduler.add_noise(x0, noise, timesteps), noise, timesteps, labels)
            training_step.set_lr(learning_rate(args, step, steps_left(args, step, first_step, time.perf_counter() - started)))
            if step == first_step + EAGER_STEPS_BEFORE_CAPTURE:
                training_step.capture(report)
            interval_losses.append(training_step.run().clone())
            step += 1

            seconds = earlier_seconds + time.perf_counter() - started
            out_of_time = args.max_minutes and seconds - earlier_seconds > args.max_minutes * 60
            if step % LOG_EVERY == 0 or step == args.steps or out_of_time:
                mean_loss = torch.stack(interval_losses).mean().item()
                interval_losses = []
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {step}")
                log_rows.append({"step": step, "loss": f"{mean_loss:.5f}", "lr": f"{float(optimizer.param_groups[0]['lr']):.2e}",
                                 "seconds": f"{seconds:.1f}"})
                report(f"step {step:6d}  loss {mean_loss:.4f}  {seconds:7.1f} s")
            if step % args.checkpoint_every == 0 and step < args.steps and not out_of_time:
                _save(args.out, data, network, ema, optimizer, step, training_record(None, seconds), log_rows)
            if out_of_time:
                report(f"stopping after {args.max_minutes} minutes at step {step}; --resume {args.out} continues")
                break
    if on_cuda:
        torch.cuda.current_stream(device).wait_stream(side_stream)

    seconds = earlier_seconds + time.perf_counter() - started
    ema.module.eval()
    final_ema_loss = round(evaluation_loss(ema.module, data, scheduler, device), 5)
    _save(args.out, data, network, ema, optimizer, step, training_record(final_ema_loss, seconds), log_rows)
    report(f"final EMA loss {final_ema_loss:.4f} at step {step}; wrote {args.out}")
    if log_file:
        log_file.close()
    return args.out


def main(argv: list[str] | None = None) -> Path:
    """Train from command-line arguments and return the model folder (for scripts and tests: bad
    input raises ConfigError here, where `d2dpm train` prints it in one line and exits 2)."""
    parser = argparse.ArgumentParser(prog="d2dpm train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))
