"""One training loop: seeded, checkpointed every epoch, resumable to the same weights.

The loop owns no global state: it runs inside ``torch.random.fork_rng`` so the
caller's RNG is untouched, and it saves the global and the loader's RNG
states in each checkpoint, so a resumed run draws the same batches and
dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from pydantic import Field
from torch import nn

from ..config import Config
from ..errors import SlimkitError
from ..inputs import MultiInput, call
from ..models.outputs import prediction
from ..io import write_bytes_atomic
from ..limits import first_line
from .distributed import barrier, from_main, sum_over_ranks, world

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ScoreFn = Callable[[nn.Module], float]
CHECKPOINT_FILE = "last.pt"


class TrainConfig(Config):
    epochs: int = Field(30, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = False
    seed: int = 0
    patience: int | None = Field(None, ge=1)  # early stopping: epochs without a better validation score
    # autocast for forward and loss (weights, optimizer and gradients stay fp32); fp16 adds loss scaling
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    fp32_layers: list[str] = Field(default_factory=list)  # module name globs kept in fp32 under autocast


class RecoveryConfig(TrainConfig):
    """Training right after a compression step: none unless ``epochs`` is given, at a fine-tuning rate."""

    epochs: int = Field(0, ge=0)
    lr: float = Field(1e-3, gt=0)


@dataclass
class TrainResult:
    best_score: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], loss_fn: LossFn | None = None) -> dict[str, float]:
    """Top-1 accuracy and mean loss over ``loader``; the model's train/eval mode is restored."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    device = _device(model)
    try:
        for x, y in loader:
            x, y = _to(x, device), _to(y, device)
            logits = prediction(call(model, x))
            loss_sum += float(loss_fn(logits, y)) * len(y)
            correct += int((logits.argmax(dim=-1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise SlimkitError("evaluation data is empty")
    return {"accuracy": correct / total, "loss": loss_sum / total}


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SlimkitError(f"nothing to train: {type(model).__name__} has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(
    model: nn.Module,
    train_loader: Iterable[Batch],
    val_loader: Iterable[Batch] | None,
    cfg: TrainConfig,
    *,
    score_fn: ScoreFn | None = None,
    loss_fn: LossFn | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    description: str = "train",
    on_step: Callable[[int, int], None] | None = None,
    eligible: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``model`` in place and leave it holding its best-on-validation weights.

    ``score_fn(model) -> float`` (higher is better) selects the best epoch; it
    defaults to accuracy on ``val_loader``. ``train_loader`` may be any
    re-iterable of ``(x, y)`` batches; with ``loss_fn`` the targets can be
    anything the loss accepts. ``on_step(step, total_steps)`` runs after every
    optimizer step (gradual pruning updates its masks there). While ``eligible()``
    is false (a gradual pruning schedule still ramping up) an epoch is scored and
    recorded but cannot be chosen as the best.
    """
    loss_fn = loss_fn or nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if score_fn is None:
        if val_loader is None:
            raise SlimkitError("fit needs val_loader or score_fn to choose the best epoch")
        score_fn = lambda m: evaluate(m, val_loader, loss_fn)["accuracy"]  # noqa: E731
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = sum(1 for _ in train_loader)
    if steps_per_epoch == 0:
        raise SlimkitError("training data is empty")
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    sampler_gen: torch.Generator | None = getattr(train_loader, "generator", None)
    rank, world_size = world()
    progress = progress and rank == 0

    with torch.random.fork_rng(devices=[]), _fp32_layers(model, cfg):
        torch.manual_seed(cfg.seed)
        opt = _make_optimizer(model, cfg)
        sched = _make_scheduler(opt, cfg, steps_per_epoch)
        scaler = torch.amp.GradScaler(_device_type(model)) if cfg.precision == "fp16" else None
        start_epoch = 0
        result = TrainResult(best_score=-math.inf, best_epoch=-1)
        best_state = copy.deepcopy(model.state_dict())
        state = from_main(lambda: _load_checkpoint(ckpt_path)) if resume and ckpt_path is not None else None
        if state is not None:
            try:
                _restore(state, model, opt, sched, scaler, sampler_gen)
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
                raise SlimkitError(f"{ckpt_path}: cannot resume from this checkpoint: it does not fit this model and "
                                   f"configuration ({first_line(exc)}); "
                                   "delete it, or start over without --resume (--overwrite)") from None
            best_state = state["best_model"]
            result = TrainResult(state["best_score"], state["best_epoch"], state["history"],
                                 state.get("stopped_early", False))
            start_epoch = cfg.epochs if result.stopped_early else state["epoch"] + 1
        else:
            # the starting weights compete too: recovery never returns a model worse on validation
            result.best_score = float(score_fn(model)) if eligible is None or eligible() else -math.inf

        # data parallel under torchrun: DDP averages the ranks' gradients (the model itself is what is scored)
        runner = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
        with _progress(progress, description, cfg.epochs, start_epoch) as advance:
            for epoch in range(start_epoch, cfg.epochs):
                train_loss = _train_one_epoch(model, runner, train_loader, opt, sched, scaler, loss_fn, cfg,
                                              on_step, epoch * steps_per_epoch, cfg.epochs * steps_per_epoch)
                score = float(score_fn(model))
                record = {"epoch": epoch, "train_loss": train_loss, "val_score": score, "lr": sched.get_last_lr()[0]}
                can_win = eligible is None or eligible()
                if not can_win:
                    record["eligible"] = False
                result.history.append(record)
                if can_win and score > result.best_score:
                    result.best_score, result.best_epoch = score, epoch
                    best_state = copy.deepcopy(model.state_dict())
                result.stopped_early = cfg.patience is not None and epoch - result.best_epoch >= cfg.patience
                if ckpt_path is not None and rank == 0:
                    _save_checkpoint(ckpt_path, model, opt, sched, scaler, sampler_gen, best_state, result, epoch)
                barrier()
                advance(f"loss {train_loss:.4f}  val {score:.4f}{'' if can_win else ' (ramp)'}  "
                        f"best {_score_text(result.best_score)}" + ("  (stopped early)" if result.stopped_early else ""))
                if result.stopped_early:
                    break
        model.load_state_dict(best_state)
    model.eval()
    return result


def _score_text(score: float) -> str:
    """A best score for people; -inf: no epoch could be chosen yet (an AGP ramp still pruning)."""
    return "-" if score == -math.inf else f"{score:.4f}"


def _device(model: nn.Module) -> torch.device:
    """Where the model's parameters are: batches follow them there."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | str | None) -> Iterator[nn.Module]:
    """Train on ``device`` (None: where the model is), then move the model back to where it was:
    the stages around training (pruning decisions, export, packing) keep working on the CPU."""
    home = _device(model)
    if device is None or torch.device(device) == home:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def _device_type(model: nn.Module) -> str:
    return _device(model).type


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, (torch.Tensor, MultiInput)) else value


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _fp32_layers:
    """While training under autocast, run the modules matching ``cfg.fp32_layers`` in float32."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        from fnmatch import fnmatchcase

        self.device = _device_type(model)
        self.modules = [m for name, m in model.named_modules()
                        if cfg.precision != "fp32" and any(fnmatchcase(name, g) for g in cfg.fp32_layers)]
        if cfg.fp32_layers and cfg.precision != "fp32" and not self.modules:
            raise SlimkitError(f"fp32_layers {cfg.fp32_layers} match no module")

    def __enter__(self) -> None:
        for module in self.modules:
            module.forward = self._in_fp32(module.forward)

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            del module.forward  # the instance attribute goes; the class's forward is back

    def _in_fp32(self, forward):
        def run(*args, **kwargs):
            with torch.autocast(self.device, enabled=False):
                args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
                return forward(*args, **kwargs)

        return run


def _train_one_epoch(model, runner, loader, opt, sched, scaler, loss_fn, cfg: TrainConfig, on_step,
                     first_step: int, total_steps: int) -> float:
    """One pass over ``loader``; ``runner`` is the model, or its DistributedDataParallel wrapper."""
    model.train()
    total, count = 0.0, 0
    device = _device(model)
    for i, (x, y) in enumerate(loader):
        x, y = _to(x, device), _to(y, device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(cfg.precision),
                            enabled=cfg.precision != "fp32"):
            loss = loss_fn(prediction(call(runner, x)), y).float()
        if not torch.isfinite(loss):
            raise SlimkitError(f"training diverged: loss is {loss.item()} (try a lower lr)")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        if on_step is not None:
            on_step(first_step + i + 1, total_steps)
        total += loss.item() * len(y)
        count += len(y)
    total, count = sum_over_ranks(total, count)  # the epoch's loss over the global batches, not this rank's share
    return total / max(1, count)


def _restore(state: dict[str, Any], model: nn.Module, opt, sched, scaler, sampler_gen) -> None:
    """Put a checkpoint's model, optimizer, schedule, loss-scaler and RNG states back."""
    model.load_state_dict(state["model"])
    model.load_state_dict(state["best_model"])  # checked now, loaded again at the end of training
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    for param_state in opt.state.values():  # fresh allocations, as an uninterrupted run's state has
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                param_state[key] = value.clone()
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if sampler_gen is not None and state.get("sampler_rng") is not None:
        sampler_gen.set_state(state["sampler_rng"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "best_model", "best_score", "best_epoch", "history",
                   "epoch")


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint's state, checked: damaged, foreign or code-carrying files are named errors.

    torch's reader does not check the CRC-32 its zip format stores for every record, so a flipped
    byte would resume silently with a changed weight; ``zipfile`` checks them first.
    """
    import pickle

    from ..modelfile.store import unpickle_reason

    if not path.is_file():
        return None
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise SlimkitError(f"{path}: cannot read the checkpoint ({exc.strerror})") from None
    if zipfile.is_zipfile(io.BytesIO(blob)):
        try:
            damaged = zipfile.ZipFile(io.BytesIO(blob)).testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            damaged = str(exc)
        if damaged is not None:
            raise SlimkitError(f"{path}: the checkpoint is damaged (record {damaged} fails its checksum); delete it, "
                               "or start over without --resume (--overwrite)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as exc:
        raise SlimkitError(f"{path}: refused as a checkpoint: not a file torch.load(weights_only=True) reads "
                           f"({unpickle_reason(exc)})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise SlimkitError(f"{path}: not a slimkit training checkpoint (missing {', '.join(missing)})")
    return state


def _save_checkpoint(path: Path, model, opt, sched, scaler, sampler_gen, best_state, result: TrainResult,
                     epoch: int) -> None:
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "stopped_early": result.stopped_early,
        "rng": torch.get_rng_state(),
        "sampler_rng": sampler_gen.get_state() if sampler_gen is not None else None,
        "best_model": best_state,
        "best_score": result.best_score,
        "best_epoch": result.best_epoch,
        "history": result.history,
        "epoch": epoch,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getvalue())


PROGRESS_LINE_S = 10.0  # off a terminal: at most one progress line this often (and the last epoch's)


class _progress:
    """Per-epoch progress on stderr: a rich bar on a terminal; elsewhere (a log, a pipe) a plain line per epoch,
    at most every ``PROGRESS_LINE_S`` seconds, with the time left; nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, description: str, total: int, done: int):
        self.enabled, self.description, self.total, self.done = enabled, description, total, done
        self._bar = None
        self._started = self._printed = 0.0

    def __enter__(self) -> Callable[[str], None]:
        import sys
        import time

        if not (self.enabled and self.total > self.done):
            self.enabled = False
        elif sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[status]}"), transient=False, console=Console(stderr=True),
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.done, status="")
        self._started = time.perf_counter()
        self._first = self.done
        return self._advance

    def _advance(self, status: str) -> None:
        import sys
        import time

        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, status=status)
            return
        now = time.perf_counter()
        if not self.enabled or (now - self._printed < PROGRESS_LINE_S and self.done < self.total):
            return
        self._printed = now
        per_epoch = (now - self._started) / (self.done - self._first)
        left = per_epoch * (self.total - self.done)
        print(f"{self.description}: epoch {self.done}/{self.total}  {status}  "
              f"({_clock(now - self._started)} elapsed, about {_clock(left)} left)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
