"""A small model, loss and in-memory dataset with the m2f interfaces, for testing the engine alone."""

from __future__ import annotations

import os

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
    out_dir, *, criterion=tiny_criterion, dropout: float = 0.5, resume: bool = False, **settings
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
        metadata={"config": "tiny-test"},
        resume=resume,
    )


def first_step_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Runs forward/backward of optimizer step 1 and returns the (rank-averaged) gradients."""
    trainer.optimizer.zero_grad(set_to_none=True)
    micro_batches = [next(trainer.batches) for _ in range(trainer.settings.grad_accum_steps)]
    trainer.forward_backward(micro_batches)
    return {name: p.grad.detach().clone() for name, p in trainer.module.named_parameters()}


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
