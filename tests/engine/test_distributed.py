import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp
from engine_standins import (
    ddp_worker,
    first_step_gradients,
    free_port,
    late_import_ddp_worker,
    make_trainer,
    nan_after_checkpoint_ddp_worker,
    predict_ddp_worker,
    real_model_ddp_worker,
)

from m2f.engine import checkpoint as ckpt


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)

    single = first_step_gradients(make_trainer(tmp_path / "single_grad", dropout=0.0, max_iters=2))
    ddp = torch.load(tmp_path / "gradients.pt", weights_only=True)
    assert ddp.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-7, msg=name)

    single_final = make_trainer(tmp_path / "single", dropout=0.0, max_iters=2).train()
    expected = safetensors.torch.load_file(str(single_final))
    got = safetensors.torch.load_file(str(tmp_path / "run" / "model_final.safetensors"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_every_rank_names_the_last_checkpoint_when_the_loss_turns_nan(tmp_path):
    """Only rank 0 writes checkpoints; the other ranks said none was written."""
    mp.spawn(nan_after_checkpoint_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    assert ckpt.find_last_checkpoint(tmp_path).name == "model_0000003.safetensors"
    for rank in range(2):
        message = (tmp_path / f"message_{rank}.txt").read_text()
        assert "iteration 4" in message and "model_0000003.safetensors" in message, (rank, message)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_leaving_the_group_stops_its_threads_after_a_late_torch_dynamo_import(tmp_path):
    """A group that outlived cleanup() kept gloo threads that could free a collective's tensors while the
    interpreter exited: "terminate called without an active exception", the process aborted."""
    mp.spawn(late_import_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        before, after = map(int, (tmp_path / f"threads_{rank}.txt").read_text().split())
        assert after == before, (rank, before, after)


@pytest.mark.slow
def test_demo_tiny_trains_under_two_process_ddp(tmp_path):
    from m2f.data import make_synthetic

    make_synthetic(str(tmp_path / "data"), num_train=4, num_val=1, image_size=64)
    out = tmp_path / "run"
    mp.spawn(
        real_model_ddp_worker, args=(2, free_port(), str(tmp_path / "data"), str(out)), nprocs=2, join=True
    )
    weights = safetensors.torch.load_file(str(out / "model_final.safetensors"))
    for name, tensor in weights.items():
        assert torch.isfinite(tensor.float()).all(), name
    with (out / "metrics.csv").open() as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["1", "2"]
    assert ckpt.find_last_checkpoint(out).name == "model_0000002.safetensors"
    state = ckpt.load_training_state(out / "model_0000002.safetensors")
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def run_predict_workers(world_size: int, images: list[str], checkpoint, images_json, out) -> list[dict]:
    args = (world_size, free_port(), images, str(checkpoint), str(images_json), str(out))
    mp.spawn(predict_ddp_worker, args=args, nprocs=world_size, join=True)
    return [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(world_size)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_predict_under_two_process_ddp_shares_the_images(tmp_path):
    """Each rank predicts half of the images; the files, results files included, are those of one process,
    and every rank returns all their paths. An image one rank cannot read stops both ranks with its error."""
    from m2f.data import make_synthetic
    from m2f.engine.checkpoint import load_config_for_checkpoint
    from m2f.engine.evaluate import build_checkpoint_model
    from m2f.engine.train import run_training

    data = Path(make_synthetic(str(tmp_path / "data"), num_train=3, num_val=2, image_size=64))
    run = tmp_path / "run"
    run_training(
        "demo-tiny", data, run, max_iters=1, batch_size=2, image_size=64, num_workers=0, progress=False
    )
    metadata, _ = ckpt.read_header(run / "model_final.safetensors")
    model = build_checkpoint_model(
        load_config_for_checkpoint(None, metadata, run), run / "model_final.safetensors"
    )
    with torch.no_grad():  # confident enough for panoptic segments
        model.transformer_decoder.class_embed.weight.mul_(30)
        model.transformer_decoder.mask_embed.layers[-1].weight.mul_(30)
    checkpoint = tmp_path / "confident.safetensors"
    ckpt.save_weights(checkpoint, model, metadata)
    images = sorted(map(str, (data / "train2017").glob("*.jpg")))
    images_json = data / "annotations" / "panoptic_train2017.json"

    single = run_predict_workers(1, images, checkpoint, images_json, tmp_path / "single")
    shared = run_predict_workers(2, images, checkpoint, images_json, tmp_path / "shared")
    assert [report["predicted"] for report in single] == [3]
    assert [report["predicted"] for report in shared] == [2, 1]
    files = {p.name: p.read_bytes() for p in (tmp_path / "single").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "shared").iterdir()} == files
    panoptic = json.loads(files["panoptic_results.json"])["annotations"]
    assert sorted(a["image_id"] for a in panoptic) == [1, 2, 3] and any(a["segments_info"] for a in panoptic)
    assert {result["image_id"] for result in json.loads(files["instances_results.json"])} == {1, 2, 3}
    for report in shared:
        assert report["written"] == [p.replace("single", "shared") for p in single[0]["written"]]

    broken = tmp_path / "images" / Path(images[1]).name
    broken.parent.mkdir()
    broken.write_bytes(b"not a JPEG")
    reports = run_predict_workers(
        2, [images[0], str(broken), images[2]], checkpoint, images_json, tmp_path / "b"
    )
    message = f"cannot read image {broken}: cannot identify image file '{broken}'"
    assert [report["error"] for report in reports] == [message] * 2


def test_pick_device_names_a_missing_gpu(monkeypatch):
    from m2f.engine.distributed import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees 0 CUDA GPUs; use --device cpu"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="device must be 'cuda', 'cpu' or another torch device"):
        pick_device("gpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="needs GPU 1"):
        pick_device("cuda:1")
