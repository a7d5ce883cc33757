"""A small model, loss and in-memory dataset with the m2f interfaces, for testing the engine alone."""

from __future__ import annotations

import os
import random
import socket
import time

import torch
from torch import nn

from m2f.engine.train import Trainer, TrainSettings


class TinyNet(nn.Module):
    """images (B, 3, H, W) 0..255 -> {"pred": (B, 3)}; has a backbone, a norm, an embedding and dropout."""

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.query = nn.Embedding(2, 8)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8, 3)
        self.head_norm = nn.LayerNorm(3)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images / 255.0).mean(dim=(2, 3)) + self.query.weight.sum(0)
        return {"pred": self.head_norm(self.head(self.dropout(features)))}


def tiny_criterion(outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
    """Weighted loss terms: mean squared error and a 0.5-weighted mean absolute error."""
    target = torch.stack([t["value"] for t in targets])
    return {
        "loss_mse": ((outputs["pred"] - target) ** 2).mean(),
        "loss_l1": 0.5 * (outputs["pred"] - target).abs().mean(),
    }


class NoisyDataset(torch.utils.data.Dataset):
    """Fixed images and targets; each read adds torch.randn noise to the image (a random augmentation)."""

    def __init__(self, size: int = 12, image_size: int = 8):
        generator = torch.Generator().manual_seed(1234)
        self.images = torch.randint(0, 256, (size, 3, image_size, image_size), generator=generator)
        self.values = torch.randn(size, 3, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = (self.images[index].float() + 8 * torch.randn(self.images[index].shape)).clamp(0, 255)
        return {"image": image, "value": self.values[index], "image_id": index}


def collate_tiny(items: list[dict]):
    images = torch.stack([item["image"] for item in items])
    targets = [{"value": item["value"]} for item in items]
    infos = [{"image_id": item["image_id"]} for item in items]
    return images, targets, infos


def make_trainer(
    out_dir,
    *,
    criterion=tiny_criterion,
    dropout: float = 0.5,
    resume: bool = False,
    metadata: dict[str, str] | None = None,
    **settings,
):
    values = dict(
        max_iters=6,
        batch_size=4,
        base_lr=1e-2,
        checkpoint_period=3,
        log_period=1,
        num_workers=0,
        progress=False,
    )
    values.update(settings)
    torch.manual_seed(0)
    return Trainer(
        TinyNet(dropout),
        criterion,
        NoisyDataset(),
        collate_tiny,
        TrainSettings(**values),
        out_dir,
        metadata={"config": "tiny-test"} if metadata is None else metadata,
        resume=resume,
    )


def first_step_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Runs forward/backward of optimizer step 1 and returns the (rank-averaged) gradients."""
    trainer.optimizer.zero_grad(set_to_none=True)
    micro_batches = [next(trainer.batches) for _ in range(trainer.settings.grad_accum_steps)]
    trainer.forward_backward(micro_batches)
    return {name: p.grad.detach().clone() for name, p in trainer.module.named_parameters()}


def free_port() -> int:
    """A free TCP port outside the kernel's ephemeral range, for MASTER_PORT. A port the kernel handed out for
    port 0 could be handed to another socket before the process group binds it; these are not."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
    outside = [port for port in range(10_000, 65_536) if not low <= port <= high]
    for port in random.Random().sample(outside, min(100, len(outside))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port found outside the ephemeral range")


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of a gloo DDP run: saves step-1 gradients, then trains 2 steps and saves the weights."""
    from m2f.engine import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_distributed("cpu")
    try:
        trainer = make_trainer(os.path.join(out_dir, "run"), dropout=0.0, max_iters=2)
        gradients = first_step_gradients(trainer)
        if rank == 0:
            torch.save(gradients, os.path.join(out_dir, "gradients.pt"))
        trainer = make_trainer(os.path.join(out_dir, "run"), dropout=0.0, max_iters=2)
        trainer.train()
    finally:
        distributed.cleanup()


def nan_after_checkpoint_ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of a gloo DDP run whose loss turns NaN at iteration 4, after the checkpoint of iteration 3;
    writes the FloatingPointError's message to message_<rank>.txt."""
    from m2f.engine import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_distributed("cpu")
    calls = [0]

    def criterion(outputs, targets):
        calls[0] += 1
        losses = tiny_criterion(outputs, targets)
        if calls[0] > 3:
            losses["loss_mse"] = losses["loss_mse"] * float("nan")
        return losses

    try:
        make_trainer(out_dir, criterion=criterion, dropout=0.0, max_iters=6, checkpoint_period=3).train()
    except FloatingPointError as error:
        with open(os.path.join(out_dir, f"message_{rank}.txt"), "w") as f:
            f.write(str(error))
    finally:
        distributed.cleanup()


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def late_import_ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank that imports torch._dynamo after joining the group (as a model built after init_distributed
    does through timm), gathers objects and leaves; writes its thread counts before joining and after leaving
    to threads_<rank>.txt."""
    from m2f.engine import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    before = thread_count()
    distributed.init_distributed("cpu")
    try:
        import torch._dynamo  # noqa: F401

        distributed.all_gather_object({"rank": rank})
        distributed.broadcast_object([rank])
    finally:
        distributed.cleanup()
    # The group's threads end shortly after it is destroyed, not at once: allow them a few seconds.
    deadline = time.monotonic() + 10
    while thread_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(os.path.join(out_dir, f"threads_{rank}.txt"), "w") as f:
        f.write(f"{before} {thread_count()}")


def real_model_ddp_worker(rank: int, world_size: int, port: int, data_root: str, out_dir: str) -> None:
    """One rank of `m2f train`'s code path on demo-tiny under gloo DDP."""
    from m2f.engine import distributed
    from m2f.engine.train import run_training

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        run_training(
            "demo-tiny",
            data_root,
            out_dir,
            max_iters=2,
            batch_size=2,
            image_size=64,
            num_workers=0,
            log_period=1,
            device="cpu",
            progress=False,
        )
    finally:
        distributed.cleanup()


def predict_ddp_worker(
    rank: int, world_size: int, port: int, images: list[str], checkpoint: str, images_json: str, out: str
) -> None:
    """One rank of `m2f predict`'s code path (panoptic and instance, with the COCO results of the images
    images_json lists) under gloo DDP when world_size > 1. Writes <out>.rank<rank>.json: the paths returned or
    the ValueError raised, and the number of images this rank predicted."""
    import json

    from m2f.engine import distributed, predict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    predicted = []
    predict_masks = predict.predict_masks
    predict.predict_masks = lambda *args, **kwargs: predicted.append(1) or predict_masks(*args, **kwargs)
    report = {"predicted": 0}
    try:
        written = predict.run_prediction(
            images,
            checkpoint,
            out,
            tasks=["panoptic", "instance"],
            device="cpu",
            coco_results=images_json,
        )
        report["written"] = sorted(map(str, written))
    except ValueError as error:
        report["error"] = str(error)
    finally:
        report["predicted"] = len(predicted)
        distributed.cleanup()
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(report, f)


class OracleModel(nn.Module):
    """Answers each forward with the ground truth of the next queued image: one confident query per segment
    (class logit 10) whose mask logits are +-20 on the ground-truth mask, the other queries "no object"."""

    def __init__(
        self, ground_truth: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int, num_queries=16
    ):
        super().__init__()
        self.ground_truth = list(ground_truth)
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.size_divisibility = 32
        self.register_buffer("pixel_mean", torch.zeros(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> dict:
        labels, masks = self.ground_truth.pop(0)
        height, width = -(-images.shape[-2] // 4), -(-images.shape[-1] // 4)
        assert masks.shape[-2:] == (height, width), "the test expects 1/4 of the input = the original size"
        logits = torch.full((1, self.num_queries, self.num_classes + 1), -10.0)
        logits[0, :, -1] = 10.0
        mask_logits = torch.full((1, self.num_queries, height, width), -20.0)
        for q, (label, mask) in enumerate(zip(labels.tolist(), masks)):
            logits[0, q, -1] = -10.0
            logits[0, q, label] = 10.0
            mask_logits[0, q][mask] = 20.0
        return {"pred_logits": logits, "pred_masks": mask_logits}


def oracle_eval_setup(data_root, kind="coco-panoptic"):
    """(config, dataset) for evaluating an OracleModel on the val split of a dataset of `kind`: demo-tiny
    with inference at 256, the dataset built with its inference transform."""
    import dataclasses

    from m2f.config import get_config
    from m2f.engine.evaluate import inference_transform
    from m2f.engine.train import build_dataset

    config = get_config("demo-tiny")
    inference = dataclasses.replace(config.inference, test_short_edge=256, test_max_size=256)
    config = dataclasses.replace(config, inference=inference)
    return config, build_dataset(kind, data_root, "val", inference_transform(config))


def oracle_answers(
    data_root, silent: set[int] = frozenset(), kind="coco-panoptic"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ground truth (labels, masks) of every val image of a panoptic dataset of `kind`; no segment at all
    for the indices in `silent`."""
    from m2f.engine.train import build_dataset

    answers = []
    for index, item in enumerate(build_dataset(kind, data_root, "val")):
        if index in silent:
            height, width = item["masks"].shape[-2:]
            answers.append(
                (torch.zeros(0, dtype=torch.int64), torch.zeros(0, height, width, dtype=torch.bool))
            )
        else:
            answers.append((item["labels"], item["masks"]))
    return answers


def eval_parts_ddp_worker(
    rank: int, world_size: int, port: int, data_root: str, parts_dir: str, out: str
) -> None:
    """One rank of a gloo evaluation in parts of one image (rank r predicts the images i with i % 2 == r);
    rank 0 writes the results JSON to `out`."""
    import json

    from m2f.engine import distributed, evaluate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_distributed("cpu")
    try:
        evaluate.PART_SIZE = 1
        config, dataset = oracle_eval_setup(data_root)
        answers = oracle_answers(data_root, silent={1})
        mine = [answers[i] for i in range(len(dataset)) if i % world_size == rank]
        model = OracleModel(mine, dataset.metadata.num_classes)
        result = evaluate.evaluate_model(
            model, dataset, config, progress=False, parts_dir=parts_dir, run_key={"run": 1}
        )
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result["results"], f)
    finally:
        distributed.cleanup()
