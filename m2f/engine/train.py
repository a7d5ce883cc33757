"""The training loop: AdamW with Mask2Former's parameter groups, step schedule, full-model gradient clipping,
AMP, gradient accumulation, DDP, CSV logging, periodic evaluation, atomic checkpoints and exact resume.

Iterations are counted from 1: checkpoint model_0000100 holds the weights after 100 optimizer steps, and a
non-finite loss in the 7th step is reported as "iteration 7".
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from m2f.checks import check_int
from m2f.engine import checkpoint as ckpt
from m2f.engine import distributed as dist_utils
from m2f.files import check_output_path, remove_stale_temporaries, write_bytes_atomic
from m2f.losses.criterion import Criterion

EMBEDDING_PARAMETER_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SEED = 2**32  # numpy's limit; the data stream's generators are seeded with seed * 1_000_003 + epoch


@dataclass
class TrainSettings:
    """Solver and loop settings. batch_size is the global batch: images per optimizer step over all ranks
    and accumulation steps (must be divisible by world_size * grad_accum_steps). lr_steps are iterations.
    lr_schedule "step" multiplies the lr by lr_gamma at each of lr_steps; "poly" by (1 - i/max_iters)^power.
    The first warmup_iters ramp linearly from warmup_factor * lr (1.0 = no warmup)."""

    max_iters: int
    batch_size: int = 16
    base_lr: float = 1e-4
    weight_decay: float = 0.05
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    backbone_lr_multiplier: float = 0.1
    clip_grad_norm: float | None = 0.01
    lr_schedule: str = "step"
    lr_steps: tuple[int, ...] | None = None
    lr_gamma: float = 0.1
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 1.0
    grad_accum_steps: int = 1
    amp: str | None = None
    checkpoint_period: int = 5000
    eval_period: int = 0
    log_period: int = 20
    num_workers: int = 4
    seed: int = 0
    progress: bool = True
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        for name in ("max_iters", "batch_size", "grad_accum_steps", "checkpoint_period", "log_period"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        for name in ("eval_period", "num_workers", "warmup_iters", "seed"):
            setattr(self, name, check_int(name, getattr(self, name), 0))
        if self.seed >= MAX_SEED:
            raise ValueError(f"seed must be below 2**32 ({MAX_SEED}), got {self.seed}")
        if self.amp not in (None, *AMP_DTYPES):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if self.lr_schedule not in ("step", "poly"):
            raise ValueError(f"lr_schedule must be 'step' or 'poly', got {self.lr_schedule!r}")
        if self.lr_steps is None:
            self.lr_steps = (int(0.9 * self.max_iters), int(0.95 * self.max_iters))
        positive = ("base_lr", "lr_gamma", "warmup_factor")
        non_negative = (
            "weight_decay",
            "weight_decay_norm",
            "weight_decay_embed",
            "backbone_lr_multiplier",
            "poly_power",
        )
        for name in (*positive, *non_negative):
            value = getattr(self, name)
            finite = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not (finite and (value > 0 if name in positive else value >= 0)):
                bound = "> 0" if name in positive else ">= 0"
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
        # clip_grad_norm_ with 0 zeroes the gradients and with a negative norm reverses them.
        if self.clip_grad_norm is not None and not 0 < self.clip_grad_norm < math.inf:
            raise ValueError(f"clip_grad_norm must be None (no clipping) or > 0, got {self.clip_grad_norm!r}")

    @classmethod
    def from_solver(cls, solver, max_iters: int | None = None, **overrides) -> TrainSettings:
        """Settings from an m2f.config.SolverConfig. A different max_iters scales the lr steps with it (the
        paper's x0.1 at 0.9 and 0.95 of training stays at 0.9 and 0.95)."""
        max_iters = solver.max_iter if max_iters is None else max_iters
        steps = tuple(round(step * max_iters / solver.max_iter) for step in solver.lr_steps)
        values = dict(
            max_iters=max_iters,
            batch_size=solver.batch_size,
            base_lr=solver.lr,
            weight_decay=solver.weight_decay,
            weight_decay_norm=solver.weight_decay_norm,
            weight_decay_embed=solver.weight_decay_embed,
            backbone_lr_multiplier=solver.backbone_lr_multiplier,
            clip_grad_norm=solver.grad_clip_norm,
            lr_schedule=solver.lr_schedule,
            lr_steps=steps,
            lr_gamma=solver.lr_gamma,
            poly_power=solver.poly_power,
            warmup_iters=min(solver.warmup_iters, max_iters),
            warmup_factor=solver.warmup_factor,
        )
        values.update(overrides)
        return cls(**values)


# detectron2's norm_module_types (FrozenBatchNorm2d holds buffers only). By type, not by class name: a conv
# followed by a norm, such as the pixel decoder's Conv2dNorm, keeps the weight decay of its conv weight.
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def synchronize_batch_norm(model: nn.Module, device: torch.device, announce: bool = True) -> nn.Module:
    """Under DDP on GPUs, the BatchNorm layers of `model` become SyncBatchNorm, which normalizes over the
    whole batch of all processes (detectron2's "SyncBN": Mask2Former's norm where a ResNet's BatchNorm is not
    frozen); their parameters and buffers stay the same tensors. In one process the model is returned as it
    is, and under DDP on CPUs too, which SyncBatchNorm does not run on: there each process normalizes over
    its own part of the batch (said once when announce)."""
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not dist_utils.is_distributed() or not batch_norms:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if announce:
        print(
            f"the model's {len(batch_norms)} BatchNorm layers normalize over each process's part of the batch: "
            "SyncBatchNorm runs on GPUs only"
        )
    return model


def is_norm_module(module: nn.Module) -> bool:
    """Normalization layers, whose parameters train with weight_decay_norm."""
    return isinstance(module, NORM_TYPES)


def build_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    backbone_lr_multiplier: float,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
) -> list[dict]:
    """Mask2Former's AdamW groups: parameters under `backbone.` train at lr * backbone_lr_multiplier;
    norm parameters get weight_decay_norm, embeddings (nn.Embedding, Swin's position tables)
    weight_decay_embed. Frozen parameters are left out. One group per (backbone or not, kind), each with
    `initial_lr`."""
    groups: dict[tuple[bool, str], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            in_backbone = full_name.startswith("backbone.")
            if isinstance(module, nn.Embedding) or param_name in EMBEDDING_PARAMETER_NAMES:
                kind, decay = "embed", weight_decay_embed
            elif is_norm_module(module):
                kind, decay = "norm", weight_decay_norm
            else:
                kind, decay = "weight", weight_decay
            key = (in_backbone, kind)
            if key not in groups:
                lr = base_lr * (backbone_lr_multiplier if in_backbone else 1.0)
                groups[key] = {
                    "name": ("backbone_" if in_backbone else "head_") + kind,
                    "params": [],
                    "lr": lr,
                    "initial_lr": lr,
                    "weight_decay": decay,
                }
            groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


GROUP_SETTINGS = ("initial_lr", "weight_decay")  # set per parameter group by build_param_groups


class LRSchedule:
    """The lr factor after `iterations_done` optimizer steps (see TrainSettings for the rules)."""

    STATE = ("max_iters", "kind", "steps", "gamma", "poly_power", "warmup_iters", "warmup_factor")

    def __init__(self, settings: TrainSettings):
        self.max_iters = settings.max_iters
        self.kind = settings.lr_schedule
        self.steps = [int(step) for step in settings.lr_steps]
        self.gamma = settings.lr_gamma
        self.poly_power = settings.poly_power
        self.warmup_iters = settings.warmup_iters
        self.warmup_factor = settings.warmup_factor

    def factor(self, iterations_done: int) -> float:
        if self.kind == "step":
            factor = self.gamma ** sum(iterations_done >= step for step in self.steps)
        else:
            factor = max(0.0, 1.0 - iterations_done / self.max_iters) ** self.poly_power
        if iterations_done < self.warmup_iters:
            alpha = iterations_done / self.warmup_iters
            factor *= self.warmup_factor * (1.0 - alpha) + alpha
        return factor

    def apply(self, optimizer: torch.optim.Optimizer, iterations_done: int) -> None:
        factor = self.factor(iterations_done)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.STATE}


class StreamBatchSampler:
    """An endless, reproducible stream of shuffled samples, cut into this rank's micro-batches.

    Global position p of the stream is sample perm_e[p mod N] with e = p div N and perm_e a permutation
    seeded by (seed, e). Optimizer step i uses positions [i*B, (i+1)*B); its micro-batch a covers B/A of
    them, of which rank r takes the r-th of W equal slices. So the samples of a global batch do not depend on
    the number of ranks or accumulation steps, and resuming at step i needs only i. Yields lists of
    (position, index).
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        grad_accum_steps: int,
        rank: int,
        world_size: int,
        seed: int,
        start_iteration: int = 0,
    ):
        self.check(dataset_size, batch_size, grad_accum_steps, world_size)
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.grad_accum_steps = grad_accum_steps
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_iteration = start_iteration
        self.micro_batch_per_rank = batch_size // (grad_accum_steps * world_size)
        self._epoch = -1
        self._permutation: list[int] = []

    @staticmethod
    def check(dataset_size: int | None, batch_size: int, grad_accum_steps: int, world_size: int) -> None:
        """Raises unless the dataset has samples (None: not known yet) and the batch splits evenly into
        micro-batches per rank."""
        if dataset_size is not None and dataset_size < 1:
            raise ValueError("the training dataset is empty")
        if batch_size % (grad_accum_steps * world_size) != 0:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by grad_accum_steps ({grad_accum_steps}) x "
                f"world size ({world_size})"
            )

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.dataset_size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.dataset_size, generator=generator).tolist()
            self._epoch = epoch
        return self._permutation[offset]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro = self.batch_size // self.grad_accum_steps
        for iteration in itertools.count(self.start_iteration):
            for step in range(self.grad_accum_steps):
                first = iteration * self.batch_size + step * micro + self.rank * self.micro_batch_per_rank
                yield [(p, self.index_at(p)) for p in range(first, first + self.micro_batch_per_rank)]


class SeededSamples(torch.utils.data.Dataset):
    """Reads dataset[index] for a (position, index) key with python/numpy/torch RNGs seeded from
    (seed, position), so random augmentations are the same whatever the worker count or resume point. The
    caller's RNG states are restored afterwards."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        position, index = key
        sample_seed = (self.seed * 1_000_003 + position) % (2**32)
        python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            np.random.seed(sample_seed)  # noqa: NPY002
            torch.manual_seed(sample_seed)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(position // len(self.dataset))
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)  # noqa: NPY002


def _flat_metadata(name: str, text: str) -> dict[str, str]:
    """{dotted name: value} of a metadata value: a JSON object's leaves (config.solver.image_size, ...), else
    {name: the value}; values shortened to 60 characters, for messages."""
    try:
        return _flat_json(name, json.loads(text))
    except ValueError:
        return {name: _shortened(text)}


def _flat_json(name: str, value) -> dict[str, str]:
    if not isinstance(value, dict):
        return {name: _shortened(json.dumps(value))}
    flat = {}
    for key, item in value.items():
        flat.update(_flat_json(f"{name}.{key}", item))
    return flat


def _shortened(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def move_to_device(obj, device: torch.device):
    """Moves tensors inside nested lists/tuples/dicts to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


# Names of the files a Trainer writes in its output folder (checkpoints, logs).
TRAINER_FILE_PREFIXES = ("model_", ckpt.LAST_CHECKPOINT_FILE, "metrics.csv", "eval.csv")


class CsvLog:
    """Appends rows to a CSV (the header and the first row written as one file); on resume, rows after the
    resume iteration are dropped, and so is a row cut short by a crash while it was appended. iterations:
    those of the rows kept and written."""

    def __init__(self, path: Path, resume_iteration: int | None):
        self.path = path
        self.fieldnames: list[str] | None = None
        self.iterations: set[int] = set()
        if resume_iteration is not None and path.exists():
            with path.open(newline="") as f:
                text = f.read()
            reader = csv.DictReader(io.StringIO(text))
            if "\n" in text and "iteration" in (reader.fieldnames or ()):
                self.fieldnames = reader.fieldnames
                complete = (row for row in reader if None not in row.values() and row["iteration"].isdigit())
                kept = [row for row in complete if int(row["iteration"]) <= resume_iteration]
                self.iterations = {int(row["iteration"]) for row in kept}
                write_bytes_atomic(path, self._csv(kept).encode())
            else:  # no complete header: an earlier version's crash between creating the file and writing it
                path.unlink()
        elif path.exists():
            path.unlink()

    def _csv(self, rows: list[dict]) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def write(self, row: dict[str, float]) -> None:
        if self.fieldnames is None:
            self.fieldnames = list(row)
            write_bytes_atomic(self.path, self._csv([row]).encode())
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.fieldnames, extrasaction="ignore").writerow(row)
        self.iterations.add(int(row["iteration"]))


LossFunction = Callable[[object, list[dict]], dict[str, torch.Tensor]]


class Trainer:
    """Runs `settings.max_iters` optimizer steps of model + criterion over `dataset`.

    model(images) -> outputs; criterion(outputs, targets) -> dict of weighted loss tensors (summed for the
    total); collate_fn(list of dataset items) -> (images, targets, infos). metadata (str -> str) goes
    into every checkpoint's safetensors header. evaluate_fn(model) -> dict of metrics runs every eval_period
    iterations and after the last one, on every rank (results logged by rank 0). Call init_distributed()
    before a Trainer for DDP.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: LossFunction,
        dataset: torch.utils.data.Dataset,
        collate_fn: Callable,
        settings: TrainSettings,
        out_dir: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        metadata: dict[str, str] | None = None,
        evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        resume: bool = False,
    ):
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.metadata = dict(metadata or {})
        self.criterion = criterion
        self.evaluate_fn = evaluate_fn
        self.rank = dist_utils.get_rank()
        self.world_size = dist_utils.get_world_size()
        self.is_main = self.rank == 0
        # Before anything changes in out_dir: a run refused here must leave the earlier one resumable.
        StreamBatchSampler.check(
            len(dataset), settings.batch_size, settings.grad_accum_steps, self.world_size
        )
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            earlier = None if resume else ckpt.forget_last_checkpoint(self.out_dir)
            if earlier is not None:
                print(
                    f"starting afresh in {self.out_dir}: --resume will no longer continue from {earlier.name}"
                )
        dist_utils.barrier()

        # The random numbers of training (the criterion's points, dropout) differ between ranks; the model's
        # initial weights were drawn before, and DDP sends rank 0's to the others.
        torch.manual_seed(settings.seed + self.rank)
        model = synchronize_batch_norm(model.to(self.device), self.device, self.is_main)
        if isinstance(criterion, nn.Module):
            criterion.to(self.device)
        self.optimizer = torch.optim.AdamW(
            build_param_groups(
                model,
                settings.base_lr,
                settings.weight_decay,
                settings.backbone_lr_multiplier,
                settings.weight_decay_norm,
                settings.weight_decay_embed,
            ),
            lr=settings.base_lr,
            weight_decay=settings.weight_decay,
        )
        self.schedule = LRSchedule(settings)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.amp == "fp16")
        self.start_iteration = 0
        self.elapsed_before = 0.0  # seconds of training before this process, when resuming
        self._train_start = time.perf_counter()
        self.last_checkpoint: Path | None = None
        resume_from = ckpt.find_last_checkpoint(self.out_dir) if resume else None
        if resume_from is not None:
            self._load(resume_from, model)
        elif resume and self.is_main:
            print(f"no checkpoint in {self.out_dir}; starting from iteration 0")
        self.module = model
        if dist_utils.is_distributed():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, find_unused_parameters=settings.find_unused_parameters
            )
        self.model = model

        self.sampler = StreamBatchSampler(
            len(dataset),
            settings.batch_size,
            settings.grad_accum_steps,
            self.rank,
            self.world_size,
            settings.seed,
            start_iteration=self.start_iteration,
        )
        self.loader = torch.utils.data.DataLoader(
            SeededSamples(dataset, settings.seed),
            batch_sampler=self.sampler,
            collate_fn=collate_fn,
            num_workers=settings.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: starting the loader must not draw from the global RNG that resume restores.
            generator=torch.Generator().manual_seed(settings.seed),
        )
        self.batches = iter(self.loader)

    def _load(self, weights_path: Path, model: nn.Module) -> None:
        saved_metadata = ckpt.load_model_weights(model, weights_path)
        state = ckpt.load_training_state(weights_path)
        wanted = [{key: group[key] for key in GROUP_SETTINGS} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        self._keep_group_settings(wanted)
        self._report_changed_settings(state)
        self._report_changed_metadata(saved_metadata)
        if state["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        elif self.is_main:
            print("resuming with fp16 a run saved without fp16: the loss scale starts afresh")
        rng_states = state["rng"]
        ckpt.restore_rng_state(rng_states[self.rank % len(rng_states)])
        self.start_iteration = int(state["iteration"])
        self.elapsed_before = float(state.get("elapsed", 0.0))
        if self.start_iteration > self.settings.max_iters:
            raise ValueError(
                f"{weights_path} is at iteration {self.start_iteration}, past max_iters "
                f"{self.settings.max_iters}: resume with max_iters >= {self.start_iteration}, or start afresh"
            )
        self.last_checkpoint = weights_path
        if self.is_main:
            print(f"resumed from {weights_path} at iteration {self.start_iteration}")

    def _keep_group_settings(self, wanted: list[dict]) -> None:
        """The optimizer state brings the checkpoint run's lr and weight decay per group; this run's settings
        (base_lr, weight decays, backbone multiplier) win, and a change is reported."""
        changed = []
        for group, settings in zip(self.optimizer.param_groups, wanted):
            for key, value in settings.items():
                if group[key] != value:
                    changed.append(f"{group['name']} {key} {group[key]:g} -> {value:g}")
                group[key] = value
        if changed and self.is_main:
            print(f"resuming with other optimizer settings than the checkpoint's: {', '.join(changed)}")

    def _report_changed_settings(self, state: dict) -> None:
        """Resuming follows these settings; says where they differ from the checkpoint's run: the schedule (a
        longer --max-iters moves the lr steps with it, so that the loop and the schedule agree on the run's
        length) and the data stream (its seed, and the batch size, which sets where it goes on)."""
        if not self.is_main:
            return
        saved = state["schedule"]
        changed = [
            f"{name} {saved.get(name)} -> {value}"
            for name, value in self.schedule.state_dict().items()
            if saved.get(name) != value
        ]
        if changed:
            print(f"resuming with another learning-rate schedule than the checkpoint's: {', '.join(changed)}")
        sampler, iteration = state["sampler"], int(state["iteration"])
        if sampler["seed"] != self.settings.seed:
            print(
                f"resuming with another data seed than the checkpoint's: {sampler['seed']} -> {self.settings.seed}"
            )
        if sampler["samples_consumed"] != iteration * self.settings.batch_size:
            print(
                f"resuming with another batch size than the checkpoint's ({sampler['samples_consumed']} samples in "
                f"{iteration} iterations): the data stream goes on from sample {iteration * self.settings.batch_size}"
            )
        saved_steps = state.get("steps", {})  # absent from checkpoints written before it was saved
        changed = [
            f"{name} {saved_steps[name]} -> {value}"
            for name, value in self._step_settings().items()
            if name in saved_steps and saved_steps[name] != value
        ]
        if changed:
            print(f"resuming with other step settings than the checkpoint's: {', '.join(changed)}")

    def _step_settings(self) -> dict:
        """How each step runs, beyond the schedule and the data stream: precision and accumulation."""
        return {"amp": self.settings.amp, "grad_accum_steps": self.settings.grad_accum_steps}

    def _report_changed_metadata(self, saved: dict[str, str]) -> None:
        """Says which values of the checkpoint's metadata (for m2f's runs: the config, e.g. the crop size, and
        the dataset) this run changes; JSON objects are compared key by key."""
        if not self.is_main:
            return
        changed = []
        for key in sorted(set(saved) & set(self.metadata)):
            old, new = _flat_metadata(key, saved[key]), _flat_metadata(key, self.metadata[key])
            changed += [
                f"{name} {old.get(name)} -> {new.get(name)}"
                for name in sorted(set(old) | set(new))
                if old.get(name) != new.get(name)
            ]
        if changed:
            print(f"resuming with another configuration than the checkpoint's: {', '.join(changed)}")

    def save(self, iterations_done: int) -> None:
        """Writes a checkpoint (rank 0), with every rank's RNG state; all ranks must call it."""
        rng_states = dist_utils.all_gather_object(ckpt.capture_rng_state())
        if self.is_main:
            training_state = {
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_states,
                "sampler": {
                    "seed": self.settings.seed,
                    "samples_consumed": iterations_done * self.settings.batch_size,
                },
                "world_size": self.world_size,
                "steps": self._step_settings(),
                "elapsed": self.elapsed_before + time.perf_counter() - self._train_start,
            }
            self.last_checkpoint = ckpt.save_checkpoint(
                self.out_dir, iterations_done, self.module, training_state, self.metadata
            )
        self.last_checkpoint = dist_utils.broadcast_object(self.last_checkpoint)

    def forward_backward(self, micro_batches: Sequence) -> torch.Tensor:
        """Accumulates gradients of the mean loss over one step's micro-batches (DDP averages over ranks);
        a Criterion's mask losses are divided by the step's target masks per micro-batch and rank, so the
        gradient is the whole batch's, as without accumulation.

        Returns the loss values, averaged over micro-batches, as a float64 tensor [total, *sorted terms].
        """
        amp_dtype = AMP_DTYPES.get(self.settings.amp)
        criterion_options = {}
        if isinstance(self.criterion, Criterion):
            # Mask2Former divides the mask losses by the target masks of the whole batch (over processes),
            # so with accumulation they count over the step's micro-batches, not each one alone.
            step_targets = [target for _images, targets, _infos in micro_batches for target in targets]
            criterion_options["num_masks"] = Criterion.average_num_masks(
                step_targets, self.device, num_batches=len(micro_batches)
            )
        summed: torch.Tensor | None = None
        for step, (images, targets, _infos) in enumerate(micro_batches):
            images = move_to_device(images, self.device)
            targets = move_to_device(targets, self.device)
            sync = step == len(micro_batches) - 1 or not isinstance(
                self.model, nn.parallel.DistributedDataParallel
            )
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = self.model(images)
                    losses = self.criterion(outputs, targets, **criterion_options)
                self.loss_names = sorted(losses)
                total = sum(losses[name].float() for name in self.loss_names)
                self.scaler.scale(total / len(micro_batches)).backward()
            values = torch.stack(
                [total.detach()] + [losses[name].detach().float() for name in self.loss_names]
            )
            summed = values.double() if summed is None else summed + values.double()
        return summed / len(micro_batches)

    def largest_gradient(self) -> torch.Tensor | None:
        """The largest |gradient| (0-dim, on the device), finite exactly when every gradient is (a 2-norm could
        overflow); None with fp16's loss scaling, which skips a step whose gradients are not finite and lowers
        the scale (without it, bf16 and float32, train() stops before such gradients reach the weights)."""
        if self.scaler.is_enabled():
            return None
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return (
            torch.nn.utils.get_total_norm(grads, math.inf) if grads else torch.zeros((), device=self.device)
        )

    def optimizer_step(self, iteration: int) -> None:
        """Clips the full-model gradient norm (fp16 gradients unscaled first), steps optimizer and scaler."""
        if self.settings.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.settings.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _stop(self, what: str) -> None:
        raise FloatingPointError(
            f"{what}; stopped without saving, the last good checkpoint is "
            f"{self.last_checkpoint or 'none (none was written)'}"
        )

    def train(self) -> Path:
        """Trains to max_iters; returns the final checkpoint's weights path.

        Raises FloatingPointError with the iteration number when a loss is NaN/inf (or the criterion refuses
        NaN/inf predictions); nothing is saved for that iteration, so the last good checkpoint stays the newest
        one.
        """
        from tqdm import tqdm

        settings = self.settings
        log = eval_log = None
        if self.is_main:
            remove_stale_temporaries(self.out_dir, TRAINER_FILE_PREFIXES)
            log = CsvLog(self.out_dir / "metrics.csv", self.start_iteration or None)
            eval_log = CsvLog(self.out_dir / "eval.csv", self.start_iteration or None)
        progress = tqdm(
            total=settings.max_iters,
            initial=self.start_iteration,
            disable=not (self.is_main and settings.progress),
            dynamic_ncols=True,
            desc="train",
        )
        if self._missing_evaluation(eval_log):  # the run stopped while evaluating its last checkpoint
            self._evaluate(self.start_iteration, eval_log)
        self.model.train()
        start_time = self._train_start = time.perf_counter()
        window_start, window_data_time, window_iters, window_other = time.perf_counter(), 0.0, 0, 0.0
        try:
            for iteration in range(self.start_iteration, settings.max_iters):
                self.schedule.apply(self.optimizer, iteration)
                self.optimizer.zero_grad(set_to_none=True)
                data_start = time.perf_counter()
                micro_batches = [next(self.batches) for _ in range(settings.grad_accum_steps)]
                window_data_time += time.perf_counter() - data_start
                try:
                    values = self.forward_backward(micro_batches)
                except FloatingPointError as error:  # e.g. the matcher refusing NaN predictions
                    self._stop(f"non-finite predictions at iteration {iteration + 1}: {error}")
                values = dist_utils.all_reduce_sum(values) / self.world_size
                largest = self.largest_gradient()
                if largest is not None:  # read with the losses: each read waits for the device
                    values = torch.cat([values, largest.to(values)[None]])
                values_list = values.tolist()
                if largest is not None:
                    largest = values_list.pop()
                if not all(math.isfinite(v) for v in values_list):
                    terms = dict(zip(["total_loss", *self.loss_names], values_list))
                    self._stop(f"non-finite loss at iteration {iteration + 1}: {terms}")
                if largest is not None and not math.isfinite(largest):
                    self._stop(f"non-finite gradients at iteration {iteration + 1} (finite loss)")
                self.optimizer_step(iteration)
                done = iteration + 1
                window_iters += 1
                lr = settings.base_lr * self.schedule.factor(
                    iteration
                )  # the head's lr (backbone: x multiplier)
                progress.update(1)
                progress.set_postfix(loss=f"{values_list[0]:.4f}", lr=f"{lr:.2e}", refresh=False)
                if self.is_main and (done % settings.log_period == 0 or done == settings.max_iters):
                    now = time.perf_counter()
                    row = {"iteration": done, "total_loss": values_list[0]}
                    row.update(zip(self.loss_names, values_list[1:]))
                    row.update(
                        lr=lr,
                        time=(now - window_start - window_other) / window_iters,
                        data_time=window_data_time / window_iters,
                        elapsed=self.elapsed_before + now - start_time,
                    )
                    log.write(row)
                    window_start, window_data_time, window_iters, window_other = now, 0.0, 0, 0.0
                other_start = time.perf_counter()  # saving and evaluating are not training time
                if done % settings.checkpoint_period == 0 or done == settings.max_iters:
                    self.save(done)
                if self._evaluation_due(done):
                    self._evaluate(done, eval_log)
                window_other += time.perf_counter() - other_start
        finally:
            progress.close()
            del self.batches
        if self.is_main:
            ckpt.save_weights(self.out_dir / "model_final.safetensors", self.module, self.metadata)
        dist_utils.barrier()
        return self.out_dir / "model_final.safetensors"

    def _missing_evaluation(self, eval_log: CsvLog | None) -> bool:
        """Whether the iteration resumed from was due an evaluation that eval.csv lacks (the same answer on
        every rank)."""
        if not self.start_iteration or not self._evaluation_due(self.start_iteration):
            return False
        return dist_utils.broadcast_object(
            eval_log is not None and self.start_iteration not in eval_log.iterations
        )

    def _evaluation_due(self, iterations_done: int) -> bool:
        """Every eval_period iterations and after the last one (as detectron2's EvalHook)."""
        period = self.settings.eval_period
        if self.evaluate_fn is None or not period:
            return False
        return iterations_done % period == 0 or iterations_done == self.settings.max_iters

    def _evaluate(self, iterations_done: int, eval_log: CsvLog | None) -> None:
        # Evaluation may draw random numbers (a data loader's seed, ...); training must go on as if it had not
        # run, as a run resumed from this iteration's checkpoint does.
        rng_state = ckpt.capture_rng_state()
        self.model.eval()
        try:
            with torch.no_grad():
                results = self.evaluate_fn(self.module)
        finally:
            self.model.train()
            ckpt.restore_rng_state(rng_state)
        if eval_log is not None:
            eval_log.write({"iteration": iterations_done, **{k: float(v) for k, v in results.items()}})


# Each dataset kind's task and layout: the panoptic and instance kinds read COCO-format files in a layout of
# m2f.data.coco_paths (cityscapes-instance: Cityscapes' instance id maps), "ade20k", "cityscapes" and
# "mapillary" their semantic label maps.
DATASET_TASKS = {
    "coco-panoptic": "panoptic",
    "coco-instance": "instance",
    "ade20k": "semantic",
    "ade20k-panoptic": "panoptic",
    "ade20k-instance": "instance",
    "cityscapes": "semantic",
    "cityscapes-panoptic": "panoptic",
    "cityscapes-instance": "instance",
    "mapillary": "semantic",
    "mapillary-panoptic": "panoptic",
}
DATASET_KINDS = tuple(DATASET_TASKS)
DATASET_LAYOUTS = {
    "coco-panoptic": "coco",
    "coco-instance": "coco",
    "ade20k": "ade20k",
    "ade20k-panoptic": "ade20k",
    "ade20k-instance": "ade20k",
    "cityscapes": "cityscapes",
    "cityscapes-panoptic": "cityscapes",
    "cityscapes-instance": "cityscapes",
    "mapillary": "mapillary",
    "mapillary-panoptic": "mapillary",
}


def default_dataset_kind(config) -> str:
    """The config's dataset in the config's task: ade20k, ade20k-panoptic or ade20k-instance for ADE20K
    configs, cityscapes, cityscapes-panoptic or cityscapes-instance for Cityscapes ones, mapillary or
    mapillary-panoptic for Mapillary Vistas ones, else coco-panoptic, coco-instance, or
    ade20k for semantic (the synthetic demo: coco-panoptic)."""
    kinds = {"panoptic": "coco-panoptic", "instance": "coco-instance", "semantic": "ade20k"}
    if config.dataset in ("ade20k", "cityscapes", "mapillary"):
        kinds = {task: f"{config.dataset}-{task}" for task in ("panoptic", "instance")}
        kinds["semantic"] = config.dataset
    kind = kinds[config.task]
    if kind not in DATASET_TASKS:
        raise ValueError(
            f"config {config.name!r}: no {config.task} dataset of {config.dataset} ({DATASET_KINDS})"
        )
    return kind


def check_dataset_kind(kind: str, name: str = "dataset") -> str:
    if kind not in DATASET_TASKS:
        raise ValueError(f"{name} must be one of {DATASET_KINDS}, got {kind!r}")
    return kind


def validate_split(data_root: str | os.PathLike, split: str, kind: str, *, check_files: bool = True) -> None:
    """m2f.data.validate_dataset of dataset `kind` on rank 0; every rank raises its DatasetError (none waits in
    a collective). check_files=False skips reading or rasterizing every segment (image files are still looked
    for); the file checks use up to 8 processes."""
    from m2f.data import DatasetError, validate_dataset

    problem = None
    if dist_utils.is_main_process():
        try:
            num_workers = min(8, os.cpu_count() or 1) if check_files else 0
            validate_dataset(
                str(data_root),
                split,
                DATASET_TASKS[kind],
                check_files=check_files,
                num_workers=num_workers,
                layout=DATASET_LAYOUTS[kind],
            )
        except DatasetError as error:
            problem = error
    problem = dist_utils.broadcast_object(problem)
    if problem is not None:
        raise problem


def build_dataset(kind: str, data_root: str | os.PathLike, split: str, transforms=None, seed: int = 0):
    """The dataset of `kind` (see DATASET_KINDS) under data_root; split "train" or "val". Instance training
    leaves out the images without an instance, as Mask2Former does."""
    from m2f import data

    check_dataset_kind(kind)
    if DATASET_TASKS[kind] == "semantic":
        semantic = {
            "ade20k": data.ADE20KDataset,
            "cityscapes": data.CityscapesDataset,
            "mapillary": data.MapillaryVistasDataset,
        }[kind]
        return semantic(str(data_root), split, transforms, seed=seed)
    options = {"layout": DATASET_LAYOUTS[kind]}
    if kind == "cityscapes-instance":
        return data.CityscapesInstanceDataset(
            str(data_root), split, transforms, seed=seed, skip_empty=split == "train"
        )
    if DATASET_TASKS[kind] == "instance":
        return data.CocoInstanceDataset(
            str(data_root), split, transforms, seed=seed, skip_empty=split == "train", **options
        )
    return data.CocoPanopticDataset(str(data_root), split, transforms, seed=seed, **options)


def checkpoint_metadata(config, dataset_kind: str, dataset_metadata) -> dict[str, str]:
    """What predict/eval need to rebuild the model and name its classes, as safetensors header strings."""
    return {
        "config": json.dumps(config.to_dict()),
        "dataset": dataset_kind,
        "class_names": json.dumps(list(dataset_metadata.class_names)),
        "thing_classes": json.dumps(sorted(dataset_metadata.thing_classes)),
        "categories": json.dumps(dataset_metadata.categories),
    }


def resolve_amp(amp: str | None, config, device: torch.device) -> str | None:
    """An explicit amp wins; otherwise configs that train with AMP use bf16 on GPUs that support it, fp16
    on other GPUs, and full precision on CPU."""
    if amp is not None or not config.solver.amp or device.type != "cuda":
        return amp
    # Without emulation: pre-Ampere GPUs create bf16 tensors, but have no bf16 tensor cores.
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def run_training(
    config,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dataset_kind: str | None = None,
    resume: bool = False,
    amp: str | None = None,
    max_iters: int | None = None,
    batch_size: int | None = None,
    image_size: int | None = None,
    grad_accum_steps: int = 1,
    num_workers: int = 4,
    checkpoint_period: int = 5000,
    eval_period: int = 0,
    log_period: int = 20,
    device: str | None = None,
    backbone_weights: str | None = None,
    init_weights: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    validate: bool = True,
    grad_checkpointing: bool = False,
) -> Path:
    """Trains a config (name or m2f.config.ModelConfig) on the train split of data_root, optionally evaluating
    on the val split every eval_period iterations and at the end; returns the final weights path. Works under
    torchrun.
    image_size overrides the config's crop size (LSJ for COCO; for ADE20K, all three tasks, Mask2Former's
    semantic recipe, SemanticAugmentation, whose test size follows it: short side image_size, long side at
    most 4 * image_size). validate: check the train split (and the val split when evaluating) before
    training: annotations, categories and image files, not the PNGs' pixels.
    init_weights: an m2f model checkpoint (.safetensors, e.g. `m2f convert`'s) to start from, for fine-tuning;
    its class head is kept when it has the dataset's number of classes, else initialized afresh. Any other
    difference from the config's model is refused. A resumed checkpoint takes precedence.
    grad_checkpointing: Mask2Former.set_grad_checkpointing (less activation memory, the same gradients)."""
    from m2f.config import ModelConfig, get_config
    from m2f.data import LSJ, SemanticAugmentation, collate
    from m2f.losses import build_criterion
    from m2f.models import build_model

    config = config if isinstance(config, ModelConfig) else get_config(config)
    check_output_path(out_dir, "out", folder=True)
    dataset_kind = check_dataset_kind(dataset_kind or default_dataset_kind(config), "dataset_kind")
    if backbone_weights is not None and not Path(backbone_weights).is_file():
        raise FileNotFoundError(f"backbone_weights: no such file: {backbone_weights}")
    if init_weights is not None:
        if backbone_weights is not None:
            raise ValueError(
                "give init_weights or backbone_weights, not both: a model checkpoint holds the backbone"
            )
        try:  # readable, before the data is read
            init_classes = ckpt.class_head_classes(ckpt.read_header(init_weights)[1])
        except ckpt.CheckpointError as error:
            raise ckpt.CheckpointError(f"init_weights: {error}") from None
    if grad_checkpointing:  # refused before the data is read when the backbone cannot have it
        from m2f.models.backbone import Backbone

        with torch.device("meta"):
            Backbone(config.backbone).set_grad_checkpointing(True)
    if image_size is not None:
        config = dataclasses.replace(config, solver=dataclasses.replace(config.solver, image_size=image_size))
    device = dist_utils.init_distributed(device)
    task = DATASET_TASKS[dataset_kind]
    if task != config.task:  # the data decides: augmentation, and what eval and predict make of the model
        if dist_utils.is_main_process():
            print(
                f"config {config.name!r} is for the {config.task} task; trained on {dataset_kind}, its model is for {task}"
            )
        config = dataclasses.replace(config, task=task)
    # Mask2Former trains ADE20K and Cityscapes (all tasks) with its semantic recipe, COCO with large-scale
    # jitter, which crops squares.
    resize_and_crop = DATASET_LAYOUTS[dataset_kind] != "coco"
    if not resize_and_crop and config.solver.crop_aspect != 1:
        raise ValueError(
            f"solver.crop_aspect {config.solver.crop_aspect}: {dataset_kind} trains with large-scale jitter, "
            "whose crops are square; crop_aspect is for ADE20K's and Cityscapes' resize-and-crop recipe"
        )
    if not resize_and_crop and config.solver.resize_base != 1:
        raise ValueError(
            f"solver.resize_base {config.solver.resize_base}: {dataset_kind} trains with large-scale jitter, "
            "which scales the crop size; resize_base is for the resize-and-crop recipe"
        )
    if resize_and_crop and config.solver.single_category_max_area < 1 and task == "instance":
        raise ValueError(
            f"solver.single_category_max_area {config.solver.single_category_max_area}: the crop's "
            "single-category limit needs a class map, which instance datasets do not have; use 1.0"
        )
    if image_size is not None and resize_and_crop:
        # The semantic recipe tests at the crop size (times resize_base), the long side at most 4 crops
        # (Mask2Former's ADE20K configs, m2f.config): a new crop size brings its test size.
        inference = dataclasses.replace(
            config.inference,
            test_short_edge=round(config.solver.resize_base * image_size),
            test_max_size=4 * image_size,
        )
        config = dataclasses.replace(config, inference=inference)
    solver = config.solver
    # Settings first: a bad value or batch split is refused before the data is read and the model built.
    settings = TrainSettings.from_solver(
        solver,
        max_iters=max_iters,
        batch_size=solver.batch_size if batch_size is None else batch_size,
        grad_accum_steps=grad_accum_steps,
        amp=resolve_amp(amp, config, device),
        checkpoint_period=checkpoint_period,
        eval_period=eval_period,
        log_period=log_period,
        num_workers=num_workers,
        seed=seed,
        progress=progress,
    )
    StreamBatchSampler.check(
        None, settings.batch_size, settings.grad_accum_steps, dist_utils.get_world_size()
    )
    if resize_and_crop:
        augmentation = SemanticAugmentation(
            solver.crop_size,
            solver.min_scale,
            solver.max_scale,
            single_category_max_area=solver.single_category_max_area,
            base=round(solver.resize_base * max(solver.crop_size)),
        )
    else:
        augmentation = LSJ(solver.image_size, solver.min_scale, solver.max_scale)
    if validate:  # before the dataset is built: both parse the annotation JSON, so one at a time
        for split in ("train", "val") if eval_period else ("train",):
            validate_split(data_root, split, dataset_kind, check_files=False)
    dataset = build_dataset(dataset_kind, data_root, "train", augmentation, seed=seed)
    config = dataclasses.replace(config, num_classes=dataset.metadata.num_classes)
    StreamBatchSampler.check(
        len(dataset), settings.batch_size, settings.grad_accum_steps, dist_utils.get_world_size()
    )
    torch.manual_seed(seed)
    model = build_model(config, backbone_weights=backbone_weights)
    model.set_grad_checkpointing(grad_checkpointing)
    if init_weights is not None:
        ckpt.load_model_weights(model, init_weights, keep_if_mis_shaped=ckpt.CLASS_HEAD_KEYS)
        if init_classes not in (None, config.num_classes) and dist_utils.is_main_process():
            print(
                f"init_weights: {init_weights} has a class head for {init_classes} classes, the dataset "
                f"{config.num_classes}; the class head starts from a random initialization"
            )
    criterion = build_criterion(config, config.num_classes)
    evaluate_fn = None
    if eval_period:
        from m2f.engine.evaluate import evaluate_model, inference_transform

        val_dataset = build_dataset(dataset_kind, data_root, "val", inference_transform(config))
        if len(val_dataset) == 0:
            raise ValueError(
                f"eval_period {eval_period}: the val split of {data_root} has no image to evaluate"
            )

        def evaluate_fn(trained: nn.Module) -> dict[str, float]:
            return evaluate_model(trained, val_dataset, config, device=device, progress=False)["summary"]

    trainer = Trainer(
        model,
        criterion,
        dataset,
        functools.partial(collate, size_divisibility=config.size_divisibility, pad_value=config.pixel_mean),
        settings,
        out_dir,
        device=device,
        metadata=checkpoint_metadata(config, dataset_kind, dataset.metadata),
        evaluate_fn=evaluate_fn,
        resume=resume,
    )
    return trainer.train()
