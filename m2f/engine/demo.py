"""`m2f demo --out DIR` (what `make demo` runs): the whole pipeline on a CPU in minutes.

1. writes the synthetic COCO-layout dataset (3 thing shapes, 3 stuff textures) to DIR/data;
2. evaluates the untrained demo-tiny model (PQ on the val split);
3. trains demo-tiny on the train split (DIR/train: checkpoints, metrics.csv);
4. evaluates the trained model and prints its PQ next to the untrained one;
5. writes overlay PNGs of val images (DIR/predictions) and the loss curve (DIR/loss_curve.png), and
   everything measured to DIR/demo_results.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from m2f.checks import check_int
from m2f.files import write_text_atomic

# Sizes and solver for a 2-core CPU: 64 px images, batch 4, a higher lr than the full-size configs.
DEMO_IMAGE_SIZE = 64
DEMO_NUM_TRAIN = 96
DEMO_NUM_VAL = 16
DEMO_BATCH_SIZE = 4
DEMO_MAX_ITERS = 500
DEMO_LR = 1e-3
DEMO_OVERLAYS = 4
# One thread by default: on a CPU shared with other work, two OpenMP threads that wait on each other were
# 10x slower per iteration than one; with one thread the 500 iterations took under 3 minutes there.
DEMO_THREADS = 1


def demo_config(max_iters: int = DEMO_MAX_ITERS, num_classes: int = 6):
    """demo-tiny with the demo's image size, batch, lr and schedule (x0.1 at 0.9 and 0.95 of max_iters)."""
    from m2f.config import get_config

    config = get_config("demo-tiny")
    solver = dataclasses.replace(
        config.solver,
        lr=DEMO_LR,
        max_iter=max_iters,
        lr_steps=(int(0.9 * max_iters), int(0.95 * max_iters)),
        warmup_iters=0,
        batch_size=DEMO_BATCH_SIZE,
        image_size=DEMO_IMAGE_SIZE,
        min_scale=0.8,
        max_scale=1.25,
    )
    inference = dataclasses.replace(
        config.inference, test_short_edge=DEMO_IMAGE_SIZE, test_max_size=DEMO_IMAGE_SIZE
    )
    return dataclasses.replace(config, num_classes=num_classes, solver=solver, inference=inference)


def run_demo(out_dir: str | Path, *, max_iters: int | None = None, threads: int | None = None) -> dict:
    """Runs the steps in the module docstring; returns the measured numbers (also in demo_results.json)."""
    from m2f.data import make_synthetic
    from m2f.engine import checkpoint as ckpt
    from m2f.engine.evaluate import run_evaluation
    from m2f.engine.predict import run_prediction
    from m2f.engine.train import build_dataset, checkpoint_metadata, run_training
    from m2f.models import build_model
    from m2f.visualize import plot_loss_curve

    max_iters = DEMO_MAX_ITERS if max_iters is None else check_int("max_iters", max_iters, 1)
    threads = DEMO_THREADS if threads is None else check_int("threads", threads, 1)
    start = time.perf_counter()
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    data_root = out_dir / "data"
    print(f"[1/5] writing the synthetic dataset to {data_root}")
    make_synthetic(str(data_root), num_train=DEMO_NUM_TRAIN, num_val=DEMO_NUM_VAL, image_size=DEMO_IMAGE_SIZE)
    metadata = build_dataset("coco-panoptic", data_root, "val").metadata
    config = demo_config(max_iters, metadata.num_classes)

    print("[2/5] evaluating the untrained model")
    torch.manual_seed(0)  # the initialization run_training(seed=0) starts from
    untrained = out_dir / "untrained.safetensors"
    ckpt.save_weights(untrained, build_model(config), checkpoint_metadata(config, "coco-panoptic", metadata))
    before = run_evaluation(untrained, data_root, num_workers=0, progress=False, device="cpu")

    print(f"[3/5] training demo-tiny for {max_iters} iterations on the CPU")
    train_start = time.perf_counter()
    final = run_training(
        config,
        data_root,
        out_dir / "train",
        max_iters=max_iters,
        num_workers=0,
        checkpoint_period=max_iters,
        log_period=10,
        device="cpu",
    )
    train_seconds = time.perf_counter() - train_start

    print("[4/5] evaluating the trained model")
    after = run_evaluation(final, data_root, num_workers=0, progress=False, device="cpu")

    print("[5/5] writing overlays and the loss curve")
    val_images = sorted((data_root / "val2017").glob("*.jpg"))[:DEMO_OVERLAYS]
    run_prediction(val_images, final, out_dir / "predictions", device="cpu")
    plot_loss_curve(
        out_dir / "train" / "metrics.csv", out_dir / "loss_curve.png", title="demo-tiny training loss"
    )

    summary = {
        "PQ_untrained": before["PQ"],
        "PQ_trained": after["PQ"],
        "SQ_trained": after["SQ"],
        "RQ_trained": after["RQ"],
        "iterations": max_iters,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    write_text_atomic(out_dir / "demo_results.json", json.dumps(summary, indent=2) + "\n")
    print(
        f"\nPQ untrained {before['PQ']:.2f} -> trained {after['PQ']:.2f} "
        f"(SQ {after['SQ']:.2f}, RQ {after['RQ']:.2f}) after {max_iters} iterations, "
        f"{summary['train_seconds']:.0f} s of training, {summary['total_seconds']:.0f} s in all"
    )
    print(f"overlays: {out_dir / 'predictions'}, loss curve: {out_dir / 'loss_curve.png'}")
    return summary
