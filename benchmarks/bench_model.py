"""Whole-model benchmark: m2f's Mask2Former against Hugging Face transformers' (same R-50 panoptic config,
random init), the same transformers model with `patch_transformers` (its deformable and masked attention
on our ops) and m2f with backend="torch" (the PyTorch reference ops), in the same run.

GPU: training step (forward + loss + backward, bf16 autocast) at 1024 x 1024, batch 2, with peak memory (m2f
also with Mask2Former.set_grad_checkpointing);
inference images/s at 800 x 1333, batch 1. CPU: inference only at 256 x 256, batch 1 (seconds per image).

    pytest benchmarks/bench_model.py -s
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from benchmarks.harness import Measurement  # noqa: E402
from m2f import build_model, get_config  # noqa: E402
from m2f.losses import build_criterion  # noqa: E402
from m2f_kernels.integrations import patch_transformers  # noqa: E402

CONFIG = "panoptic-r50"
TRAIN_SIZE, TRAIN_BATCH = (1024, 1024), 2
GPU_INFERENCE_SIZE = (800, 1333)
CPU_INFERENCE_SIZE = (256, 256)
TARGETS_PER_IMAGE = 8


def _hf_model(num_classes: int) -> torch.nn.Module:
    """transformers' Mask2Former with m2f's panoptic-r50 sizes (R-50, 6 encoder / 9 decoder layers, 100 queries)."""
    config = get_config(CONFIG)
    backbone = transformers.ResNetConfig(
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=[3, 4, 6, 3],
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    hf_config = transformers.Mask2FormerConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        num_labels=num_classes,
        num_queries=config.decoder.num_queries,
        decoder_layers=config.decoder.num_layers + 1,  # transformers counts the initial prediction
        encoder_layers=config.pixel_decoder.encoder_layers,
        feature_size=config.pixel_decoder.conv_dim,
        mask_feature_size=config.pixel_decoder.mask_dim,
        hidden_dim=config.decoder.hidden_dim,
        dim_feedforward=config.decoder.ffn_dim,
        encoder_feedforward_dim=config.pixel_decoder.encoder_ffn_dim,
        num_attention_heads=config.decoder.num_heads,
        train_num_points=config.loss.num_points,
    )
    return transformers.Mask2FormerForUniversalSegmentation(hf_config)


def _patched_copy(hf: torch.nn.Module) -> torch.nn.Module:
    """A copy of hf (same weights, device and mode), patched to run our ops."""
    patched = copy.deepcopy(hf)
    patch_transformers(patched)
    return patched


def _normalized(images: torch.Tensor) -> torch.Tensor:
    config = get_config(CONFIG)
    mean = torch.tensor(config.pixel_mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(config.pixel_std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def _targets(batch: int, size: tuple[int, int], num_classes: int, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch):
        labels = torch.randint(num_classes, (TARGETS_PER_IMAGE,), generator=generator)
        owner = torch.randint(TARGETS_PER_IMAGE, (size[0] // 32, size[1] // 32), generator=generator)
        masks = torch.stack([owner == i for i in range(TARGETS_PER_IMAGE)])
        masks = masks.repeat_interleave(32, 1).repeat_interleave(32, 2)
        targets.append({"labels": labels.to(device), "masks": masks.to(device)})
    return targets


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _inference_fns(device: torch.device, size: tuple[int, int]) -> dict:
    num_classes = get_config(CONFIG).num_classes
    images = torch.rand(1, 3, *size, device=device) * 255
    ours = build_model(CONFIG).to(device).eval()
    ours_torch = build_model(CONFIG, backend="torch").to(device).eval()
    ours_torch.load_state_dict(ours.state_dict())
    for model in (ours, ours_torch):  # as Predictor and m2f eval run it
        model.backbone.fold_frozen_batchnorm()
    hf = _hf_model(num_classes).to(device).eval()
    hf_patched = _patched_copy(hf)
    pixel_values = _normalized(images)

    def run(model, *args, **kwargs):
        def fn():
            with torch.no_grad(), _autocast(device):
                return model(*args, **kwargs)

        return fn

    return {
        "m2f": run(ours, images),
        "m2f backend=torch": run(ours_torch, images),
        "transformers": run(hf, pixel_values=pixel_values),
        "transformers patched": run(hf_patched, pixel_values=pixel_values),
    }


def _interleaved(bench, group: str, fns: dict, params: dict, warmup: int, repeats: int) -> dict:
    """CPU timing: every model is warmed up first, then each round runs every model once, so that a change of
    machine load during the run (shared CI machines) hits all models alike; timing the models one after the
    other lets it land on one of them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    results = {}
    for name, ms in times.items():
        results[name] = Measurement(group, name, "forward", statistics.median(ms), min(ms), ms, None, params)
        bench.measurements.append(results[name])
    return results


def test_model_inference(bench, device):
    size = GPU_INFERENCE_SIZE if device.type == "cuda" else CPU_INFERENCE_SIZE
    params = {"config": CONFIG, "height": size[0], "width": size[1], "batch": 1}
    fns = _inference_fns(device, size)
    if device.type == "cuda":
        results = {
            name: bench.run(
                "model_inference",
                name,
                fn,
                mode="forward",
                device=device,
                warmup=5,
                repeats=20,
                params=params,
            )
            for name, fn in fns.items()
        }
    else:
        results = _interleaved(bench, "model_inference", fns, params, warmup=1, repeats=5)
    for name, m in results.items():
        print(f"{name}: {m.median_ms / 1e3:.3f} s/image, {1e3 / m.median_ms:.2f} images/s ({size}, {device})")
    assert all(m.median_ms > 0 for m in results.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="training step benchmark needs a GPU")
def test_model_training_step(bench, device):
    config = get_config(CONFIG)
    images = torch.rand(TRAIN_BATCH, 3, *TRAIN_SIZE, device=device) * 255
    targets = _targets(TRAIN_BATCH, TRAIN_SIZE, config.num_classes, device)
    params = {"config": CONFIG, "height": TRAIN_SIZE[0], "width": TRAIN_SIZE[1], "batch": TRAIN_BATCH}

    def ours_step(backend: str, grad_checkpointing: bool = False):
        model = build_model(CONFIG, backend=backend).to(device).train()
        model.set_grad_checkpointing(grad_checkpointing)
        criterion = build_criterion(config, backend=backend)

        def fn():
            with _autocast(device):
                losses = criterion(model(images), targets)
            return sum(losses.values())

        return fn

    hf = _hf_model(config.num_classes).to(device).train()
    pixel_values = _normalized(images)
    mask_labels = [t["masks"].float() for t in targets]
    class_labels = [t["labels"] for t in targets]

    def hf_step(model):
        def fn():
            with _autocast(device):
                return model(
                    pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels
                ).loss

        return fn

    for name, fn in (
        ("m2f", ours_step("auto")),
        ("m2f grad checkpointing", ours_step("auto", grad_checkpointing=True)),
        ("m2f backend=torch", ours_step("torch")),
        ("transformers", hf_step(hf)),
        ("transformers patched", hf_step(_patched_copy(hf))),
    ):
        m = bench.run(
            "model_train_step", name, fn, mode="full", device=device, warmup=3, repeats=10, params=params
        )
        print(f"{name}: {m.median_ms:.1f} ms/step, peak {m.peak_memory_bytes / 2**30:.2f} GiB")
