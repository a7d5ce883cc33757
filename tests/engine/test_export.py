"""m2f.engine.export's checks of the exported graph, with the export and onnxruntime replaced where they would
only be slow (tests/test_cli.py exports real graphs)."""

import json

import pytest

import m2f
from m2f.engine import checkpoint as ckpt
from m2f.engine import export
from m2f_kernels.nn import MaskedMultiheadAttention

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture
def checkpoint(tmp_path):
    config = m2f.get_config("demo-tiny")
    path = tmp_path / "tiny.safetensors"
    ckpt.save_weights(path, m2f.build_model(config), {"config": json.dumps(config.to_dict())})
    return path


def thresholds(model):
    return {layer.mask_threshold for layer in model.modules() if isinstance(layer, MaskedMultiheadAttention)}


@pytest.fixture
def standins(monkeypatch):
    """Replaces the export by one that records the model's mask thresholds and returns them as the 'graph',
    and the comparison by one that returns the differences programmed per threshold."""
    calls = {"exports": [], "differences": {}}

    def fake_export(model, example, options, dynamic_size):
        (threshold,) = thresholds(model)
        calls["exports"].append(threshold)
        return str(threshold).encode()

    def fake_compare(model, data, shapes):
        difference = calls["differences"][float(data.decode())]
        return {"pred_logits": (difference, 1), "pred_masks": (difference / 2, 0)}

    monkeypatch.setattr(export, "_export", fake_export)
    monkeypatch.setattr(export, "_compare", fake_compare)
    return calls


def test_a_graph_within_the_tolerance_is_written_after_one_export(checkpoint, tmp_path, standins):
    standins["differences"] = {0.5: 3e-5}
    result = export.export_onnx(checkpoint, tmp_path / "m.onnx", height=64, width=64)
    assert standins["exports"] == [0.5]
    assert (tmp_path / "m.onnx").read_bytes() == b"0.5"
    assert result["max_difference"] == {"pred_logits": 3e-5, "pred_masks": 1.5e-5}
    assert result["max_difference_every_key_visible"] is None


def test_differences_from_the_mask_threshold_are_accepted_when_every_key_visible_matches(
    checkpoint, tmp_path, standins
):
    """A graph that misses the tolerance by less than MASK_THRESHOLD_TOLERANCE is exported again with mask
    threshold 0; the first graph is written when the second matches."""
    standins["differences"] = {0.5: 5e-3, 0.0: 2e-6}
    result = export.export_onnx(checkpoint, tmp_path / "m.onnx", height=64, width=64)
    assert standins["exports"] == [0.5, 0.0]
    assert (tmp_path / "m.onnx").read_bytes() == b"0.5"
    assert result["max_difference"]["pred_logits"] == 5e-3
    assert result["max_difference_every_key_visible"] == {"pred_logits": 2e-6, "pred_masks": 1e-6}


@pytest.mark.parametrize(
    "differences, message",
    [
        (
            {0.5: 5e-3, 0.0: 2e-4},
            r"^with every masked-attention key visible, the exported graph's pred_logits ",
        ),
        ({0.5: 2e-2, 0.0: 2e-6}, r"^the exported graph's pred_logits differs .* more than 1e-02"),
    ],
)
def test_a_graph_is_refused_where_the_mask_threshold_does_not_explain_the_differences(
    checkpoint, tmp_path, standins, differences, message
):
    standins["differences"] = differences
    with pytest.raises(ValueError, match=message):
        export.export_onnx(checkpoint, tmp_path / "m.onnx", height=64, width=64, dynamic_size=True)
    assert not (tmp_path / "m.onnx").exists()


def test_a_graph_whose_masks_alone_miss_the_tolerance_is_checked_with_every_key_visible(
    checkpoint, tmp_path, monkeypatch
):
    """pred_masks beyond TOLERANCE with pred_logits within it leads to the export with mask threshold 0 as
    well, and the graph is refused when that one does not match either."""
    exports = []

    def fake_export(model, example, options, dynamic_size):
        (threshold,) = thresholds(model)
        exports.append(threshold)
        return str(threshold).encode()

    def fake_compare(model, data, shapes):
        return {"pred_logits": (1e-6, 0), "pred_masks": (3e-3, 0)}

    monkeypatch.setattr(export, "_export", fake_export)
    monkeypatch.setattr(export, "_compare", fake_compare)
    with pytest.raises(
        ValueError, match=r"^with every masked-attention key visible, the exported graph's pred_masks"
    ):
        export.export_onnx(checkpoint, tmp_path / "m.onnx", height=64, width=64)
    assert exports == [0.5, 0.0]
    assert not (tmp_path / "m.onnx").exists()


def test_a_config_name_takes_the_class_count_of_the_checkpoint(tmp_path, standins):
    """--config names the architecture; the class head has the size of the checkpoint's classes (here 3,
    where demo-tiny has 6), so the checkpoint's weights load."""
    import dataclasses

    import safetensors.torch

    config = m2f.get_config("demo-tiny")
    assert config.num_classes != 3
    path = tmp_path / "three.safetensors"
    safetensors.torch.save_file(
        m2f.build_model(dataclasses.replace(config, num_classes=3)).state_dict(), path
    )
    standins["differences"] = {0.5: 3e-5}
    export.export_onnx(path, tmp_path / "m.onnx", config_name="demo-tiny", height=64, width=64)
    assert (tmp_path / "m.onnx").read_bytes() == b"0.5"


def test_every_key_visible_sets_the_thresholds_to_zero_and_restores_them():
    model = m2f.build_model("demo-tiny")
    assert thresholds(model) == {0.5}
    with pytest.raises(RuntimeError), export._every_key_visible(model):
        assert thresholds(model) == {0.0}
        raise RuntimeError
    assert thresholds(model) == {0.5}


def test_a_graph_whose_image_size_the_exporter_fixed_is_refused():
    def graph(shape):
        images = onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, shape)
        return onnx.helper.make_model(onnx.helper.make_graph([], "g", [images], []))

    export._check_dynamic_input(graph(["batch", 3, "height", "width"]))
    with pytest.raises(ValueError, match=r"fixed the height, width of the images \(\['batch', 3, 64, 72\]\)"):
        export._check_dynamic_input(graph(["batch", 3, 64, 72]))
    with pytest.raises(ValueError, match="fixed the batch of the images"):
        export._check_dynamic_input(graph([1, 3, "height", "width"]))
