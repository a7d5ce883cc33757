import hashlib
import os

import pytest
import torch
from engine_standins import TinyNet, make_trainer

from m2f.engine import checkpoint as ckpt


def saved_checkpoint(tmp_path):
    model = TinyNet()
    state = {"optimizer": {"step": 3}, "rng": [ckpt.capture_rng_state()]}
    path = ckpt.save_checkpoint(tmp_path, 7, model, state, {"config": "tiny-test"})
    return model, path


def test_round_trip_and_layout(tmp_path):
    model, path = saved_checkpoint(tmp_path)
    assert path == tmp_path / "model_0000007.safetensors"
    assert ckpt.find_last_checkpoint(tmp_path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last_checkpoint",
        "model_0000007.safetensors",
        "model_0000007.state.pt",
    ]
    fresh = TinyNet()
    metadata = ckpt.load_model_weights(fresh, path)
    assert metadata["config"] == "tiny-test" and metadata["iteration"] == "7"
    for (name, expected), got in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(expected, got), name
    state = ckpt.load_training_state(path)
    assert state["iteration"] == 7 and state["optimizer"] == {"step": 3}
    assert state["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_truncated_weights_file_names_the_file(tmp_path):
    _, path = saved_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        ckpt.load_model_weights(TinyNet(), path)


def test_header_gives_metadata_and_shapes_without_the_tensors(tmp_path):
    model, path = saved_checkpoint(tmp_path)
    metadata, shapes = ckpt.read_header(path)
    assert metadata == ckpt.read_weights(path)[1]
    assert shapes == {name: tuple(t.shape) for name, t in model.state_dict().items()}
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        ckpt.read_header(path)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.read_header(tmp_path / "missing.safetensors")


def test_corrupt_state_file_names_the_file(tmp_path):
    _, path = saved_checkpoint(tmp_path)
    state_path = ckpt.state_path_for(path)
    state_path.write_bytes(b"not a torch file")
    with pytest.raises(ckpt.CheckpointError, match=str(state_path)):
        ckpt.load_training_state(path)


def test_weights_swapped_under_the_state_file_is_detected(tmp_path):
    _, path = saved_checkpoint(tmp_path)
    other = TinyNet()
    with torch.no_grad():
        other.head.bias.add_(1.0)
    ckpt.save_weights(path, other, {"config": "tiny-test"})
    with pytest.raises(ckpt.CheckpointError, match="does not match"):
        ckpt.load_training_state(path)


def test_state_file_refuses_to_run_code(tmp_path):
    _, path = saved_checkpoint(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "payload": Payload()}, ckpt.state_path_for(path))
    with pytest.raises(ckpt.CheckpointError, match="corrupt training state"):
        ckpt.load_training_state(path)


def test_mismatched_model_lists_keys(tmp_path):
    _, path = saved_checkpoint(tmp_path)
    model = TinyNet()
    model.extra = torch.nn.Linear(2, 2)
    model.head = torch.nn.Linear(8, 5)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_model_weights(model, path)
    message = str(error.value)
    assert str(path) in message and "extra.weight" in message and "head.weight" in message


def test_keys_kept_if_mis_shaped_load_when_their_shape_fits(tmp_path):
    """keep_if_mis_shaped: a mis-shaped tensor of those keys leaves the model's own, one that fits is loaded;
    other mis-shaped keys are refused still."""
    source = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5))
    path = tmp_path / "w.safetensors"
    ckpt.save_weights(path, source, {})
    keep = ("1.weight", "1.bias")

    same = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5))
    ckpt.load_model_weights(same, path, keep_if_mis_shaped=keep)
    for name, tensor in source.state_dict().items():
        assert torch.equal(same.state_dict()[name], tensor), name

    other_head = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    own = {name: tensor.clone() for name, tensor in other_head.state_dict().items()}
    ckpt.load_model_weights(other_head, path, keep_if_mis_shaped=keep)
    assert torch.equal(other_head[0].weight, source[0].weight)
    assert torch.equal(other_head[1].weight, own["1.weight"]) and torch.equal(
        other_head[1].bias, own["1.bias"]
    )

    other_body = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Linear(6, 5))
    with pytest.raises(ckpt.CheckpointError, match=r"shape: 0\.bias: checkpoint \(4,\) vs model \(6,\)"):
        ckpt.load_model_weights(other_body, path, keep_if_mis_shaped=keep)


def test_resume_from_corrupt_checkpoint_names_the_file(tmp_path):
    make_trainer(tmp_path, max_iters=3).train()
    path = tmp_path / "model_0000003.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte inside the tensor data: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        make_trainer(tmp_path, max_iters=6, resume=True)


def test_last_checkpoint_pointing_nowhere_is_reported(tmp_path):
    (tmp_path / ckpt.LAST_CHECKPOINT_FILE).write_text("model_0000009.safetensors\n")
    with pytest.raises(ckpt.CheckpointError, match="model_0000009"):
        ckpt.find_last_checkpoint(tmp_path)


@pytest.mark.parametrize("visible_gpus", [1, 3])
def test_cuda_rng_states_restore_on_the_gpus_the_process_sees(monkeypatch, visible_gpus):
    """A state saved by a process that saw 2 GPUs: a resumed process with 1 restores GPU 0 only (setting
    GPU 1 raised IndexError), one with 3 restores GPUs 0 and 1."""
    state = ckpt.capture_rng_state()
    saved = [torch.tensor([index], dtype=torch.uint8) for index in range(2)]
    state["cuda"] = saved
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible_gpus)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value, device: restored.append((device, value)))
    ckpt.restore_rng_state(state)
    expected = list(enumerate(saved[:visible_gpus]))
    assert [device for device, _ in restored] == [device for device, _ in expected]
    for (_, got), (_, want) in zip(restored, expected):
        assert got is want


def test_thing_classes_must_index_the_class_names(tmp_path):
    """Indices 0..len(class_names) - 1 are classes; len(class_names) itself is one past the last."""
    names = '["cat", "dog", "sky"]'
    assert ckpt.stored_classes({"class_names": names, "thing_classes": "[0, 2]"}, "f") == (
        ["cat", "dog", "sky"],
        [0, 2],
        None,
    )
    with pytest.raises(ckpt.CheckpointError, match="beyond the 3"):
        ckpt.stored_classes({"class_names": names, "thing_classes": "[0, 3]"}, "f")


def test_class_head_classes_leaves_out_the_no_object_row():
    assert ckpt.class_head_classes({"transformer_decoder.class_embed.weight": (134, 256)}) == 133
    assert ckpt.class_head_classes({"transformer_decoder.class_embed.bias": (134,)}) is None


def test_failed_save_leaves_last_checkpoint_on_the_previous_pair(tmp_path, monkeypatch):
    """last_checkpoint moves only once both files of the new pair are in place: a crash while writing the
    training state leaves it naming the previous, complete checkpoint."""
    model, first = saved_checkpoint(tmp_path)
    real_write = ckpt.write_bytes_atomic

    def crash_on_state(path, data):
        if str(path).endswith(ckpt.STATE_SUFFIX):
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "write_bytes_atomic", crash_on_state)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 8, model, {}, {"config": "tiny-test"})
    assert ckpt.find_last_checkpoint(tmp_path) == first
    assert ckpt.load_training_state(first)["iteration"] == 7
