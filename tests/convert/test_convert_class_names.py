"""Class names carried into converted checkpoints (transformers id2label, mmdet meta, `classes`), and the
files that `m2f predict` reads back."""

import dataclasses
import json
import os

import pytest
import torch
from convert_fixtures import random_state, small_config
from safetensors.torch import save_file

from m2f.config import ModelConfig
from m2f.convert import (
    ConversionError,
    convert_checkpoint,
    convert_to_file,
    export_checkpoint,
    resolve_classes,
)
from m2f.convert.detectron2 import save_detectron2_pkl
from m2f.convert.mmdet import mmdet_class_names
from m2f.engine import checkpoint as ckpt
from m2f.engine.predict import ClassInfo, class_info

NAMES = ["cat", "sky", "dog", "road", "car"]  # small_config has 5 classes


@pytest.fixture(scope="module")
def resnet():
    config = small_config("resnet")
    return config, random_state(config)


def hf_directory(folder, config, state, id2label):
    folder.mkdir()
    save_file(export_checkpoint(state, "transformers", config), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "mask2former", "id2label": id2label}))
    return folder


def test_transformers_id2label_reaches_predict(resnet, tmp_path):
    config, state = resnet
    id2label = {str(i): name for i, name in reversed(list(enumerate(NAMES)))}  # stored out of order
    src = hf_directory(tmp_path / "hf", config, state, id2label)
    out = tmp_path / "out" / "converted.safetensors"
    _, metadata = convert_to_file(src, "transformers", config, out)

    weights, stored = ckpt.read_weights(out)
    assert stored == metadata
    assert json.loads(stored["class_names"]) == NAMES
    assert "thing_classes" not in stored
    assert stored["converted_from"] == "transformers:hf"
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], v) for k, v in state.items())
    # what `m2f predict` does with the file: config and names from the metadata, strict weight loading
    stored_config = ModelConfig.from_dict(json.loads(stored["config"]))
    assert stored_config == config
    assert class_info(stored, stored_config.num_classes, "model.safetensors") == ClassInfo(
        NAMES, set(range(5)), None
    )
    from m2f import build_model

    ckpt.load_model_weights(build_model(stored_config, backend="torch"), out)


RESNET_BACKBONE = {"model_type": "resnet", "hidden_act": "relu", "downsample_in_bottleneck": False}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_attention_heads": 8}, r"num_attention_heads 8 \(m2f: 4\)"),
        ({"pre_norm": True}, r"pre_norm True \(m2f: False\)"),
        ({"activation_function": "gelu"}, r"activation_function 'gelu' \(m2f: 'relu'\)"),
        (
            {"backbone_config": {**RESNET_BACKBONE, "downsample_in_bottleneck": True}},
            r"backbone_config.downsample_in_bottleneck True \(m2f: False\)",
        ),
        (
            {"backbone_config": {**RESNET_BACKBONE, "downsample_in_first_stage": True}},
            r"backbone_config.downsample_in_first_stage True",
        ),
        ({"backbone_config": {**RESNET_BACKBONE, "hidden_act": "gelu"}}, "backbone_config.hidden_act 'gelu'"),
        (
            {"backbone_config": {"model_type": "swin", "layer_norm_eps": 1e-6}},
            r"backbone_config.layer_norm_eps 1e-06 \(m2f: 1e-05\)",
        ),
    ],
)
def test_architecture_in_config_json_must_match(resnet, tmp_path, fields, message):
    """Settings that change the outputs but no weight shape are refused when the m2f config does not share
    them; the same values pass."""
    config, state = resnet
    src = hf_directory(tmp_path / "hf", config, state, dict(enumerate(NAMES)))
    written = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**written, **fields}))
    with pytest.raises(ConversionError, match=message) as error:
        convert_to_file(src, "transformers", config, tmp_path / "out.safetensors")
    assert str(src / "config.json") in str(error.value)
    same = {
        "num_attention_heads": 4,
        "pre_norm": False,
        "activation_function": "relu",
        "backbone_config": {**RESNET_BACKBONE, "downsample_in_first_stage": False},
    }
    (src / "config.json").write_text(json.dumps({**written, **same}))
    convert_to_file(src, "transformers", config, tmp_path / "out.safetensors")


def test_pixel_decoder_heads_and_points_must_be_transformers(resnet, tmp_path):
    """transformers' pixel decoder encoder has num_attention_heads heads of 4 points: an m2f config with the
    same heads x points product (the same weight shapes) but other factors is refused."""
    config, state = resnet
    src = hf_directory(tmp_path / "hf", config, state, dict(enumerate(NAMES)))
    decoder = config.pixel_decoder
    other_heads = dataclasses.replace(
        config,
        pixel_decoder=dataclasses.replace(decoder, encoder_heads=8, encoder_points=2),
    )
    with pytest.raises(ConversionError, match="samples 4 points per head and level"):
        convert_to_file(src, "transformers", other_heads, tmp_path / "out.safetensors")
    with pytest.raises(ConversionError, match="samples 4 points per head and level"):  # a state dict too
        convert_checkpoint(export_checkpoint(state, "transformers", config), "transformers", other_heads)
    with pytest.raises(ConversionError, match="samples 4 points per head and level"):  # and the other way
        export_checkpoint(state, "transformers", other_heads)
    (src / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    eight_heads = dataclasses.replace(
        config, pixel_decoder=dataclasses.replace(decoder, encoder_heads=8, encoder_ffn_dim=128)
    )
    with pytest.raises(
        ConversionError, match=r"num_attention_heads 4 \(m2f: pixel_decoder.encoder_heads 8\)"
    ):
        convert_to_file(src, "transformers", eight_heads, tmp_path / "out.safetensors")


def test_id2label_beside_a_weights_file(resnet, tmp_path):
    config, state = resnet
    src = hf_directory(tmp_path / "hf", config, state, dict(enumerate(NAMES)))
    _, metadata = convert_to_file(
        src / "model.safetensors", "transformers", config, tmp_path / "x.safetensors"
    )
    assert json.loads(metadata["class_names"]) == NAMES


def test_placeholder_id2label_counts_as_none(resnet, tmp_path):
    config, state = resnet
    src = hf_directory(tmp_path / "hf", config, state, {str(i): f"LABEL_{i}" for i in range(5)})
    _, metadata = convert_to_file(src, "transformers", config, tmp_path / "x.safetensors")
    assert "class_names" not in metadata
    assert class_info(metadata, 5, "model.safetensors").names == [f"class {i}" for i in range(5)]


def test_wrong_class_count_and_override(resnet, tmp_path):
    config, state = resnet
    src = hf_directory(tmp_path / "hf", config, state, {str(i): f"name{i}" for i in range(7)})
    out = tmp_path / "x.safetensors"
    with pytest.raises(ConversionError, match="7 class names do not match the 5 classes"):
        convert_to_file(src, "transformers", config, out)
    assert not out.exists()
    _, metadata = convert_to_file(src, "transformers", config, out, classes=NAMES)
    assert json.loads(metadata["class_names"]) == NAMES
    with pytest.raises(ValueError, match="classes gives 4 names but the checkpoint has 5 classes"):
        convert_to_file(src, "transformers", config, out, classes=NAMES[:4])


def test_bad_id2label_names_the_file(resnet, tmp_path):
    config, state = resnet
    src = hf_directory(tmp_path / "hf", config, state, {"1": "a", "2": "b"})
    with pytest.raises(ConversionError, match=r"id2label keys must be 0\.\.1") as error:
        convert_to_file(src, "transformers", config, tmp_path / "x.safetensors")
    assert str(src / "config.json") in str(error.value)


@pytest.mark.parametrize(
    ("meta", "names", "things"),
    [
        # mmdet 3.x panoptic: classes, thing_classes and stuff_classes
        (
            {
                "dataset_meta": {
                    "classes": NAMES,
                    "thing_classes": ["cat", "dog", "car"],
                    "stuff_classes": ["sky", "road"],
                }
            },
            NAMES,
            [0, 2, 4],
        ),
        (
            {"dataset_meta": {"classes": tuple(NAMES), "palette": [(1, 2, 3)] * 5}},
            NAMES,
            None,
        ),  # 3.x instance
        ({"CLASSES": tuple(NAMES), "mmdet_version": "2.25.0"}, NAMES, None),  # 2.x
        ({"epoch": 12}, None, None),
    ],
)
def test_mmdet_meta_reaches_the_file(resnet, tmp_path, meta, names, things):
    config, state = resnet
    src = tmp_path / "mask2former.pth"
    torch.save({"meta": meta, "state_dict": export_checkpoint(state, "mmdet", config)}, src)
    _, metadata = convert_to_file(src, "mmdet", config, tmp_path / "x.safetensors")
    _, stored = ckpt.read_weights(tmp_path / "x.safetensors")
    assert stored == metadata
    assert (json.loads(stored["class_names"]) if "class_names" in stored else None) == names
    assert (json.loads(stored["thing_classes"]) if "thing_classes" in stored else None) == things
    expected_things = set(things) if things is not None else set(range(5))
    classes = class_info(stored, 5, "model.safetensors")
    assert (classes.names, classes.things) == (names or [f"class {i}" for i in range(5)], expected_things)


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"dataset_meta": {"classes": ["a", 3]}}, r'meta\["dataset_meta"\]\["classes"\] must be a list'),
        ({"dataset_meta": {"classes": ["a"], "thing_classes": ["b"]}}, r"\['b'\] are not among its classes"),
        ({"CLASSES": "abc"}, r'meta\["CLASSES"\] must be a list'),
    ],
)
def test_bad_mmdet_meta(meta, message):
    with pytest.raises(ConversionError, match=message):
        mmdet_class_names(meta)


def test_detectron2_has_no_names_unless_given(resnet, tmp_path):
    config, state = resnet
    src = tmp_path / "model_final.pkl"
    save_detectron2_pkl(export_checkpoint(state, "detectron2", config), src)
    _, metadata = convert_to_file(src, "detectron2", config, tmp_path / "a.safetensors")
    assert "class_names" not in metadata and "thing_classes" not in metadata

    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(NAMES) + "\n\n")
    _, metadata = convert_to_file(src, "detectron2", config, tmp_path / "b.safetensors", classes=names_file)
    assert json.loads(metadata["class_names"]) == NAMES


def test_coco_categories_are_stored_for_predict_and_eval(resnet, tmp_path):
    """classes from a COCO annotation file: the checkpoint keeps the categories, so predict writes their ids."""
    config, state = resnet
    src = tmp_path / "model_final.pkl"
    save_detectron2_pkl(export_checkpoint(state, "detectron2", config), src)
    categories = [{"id": 90 - 7 * i, "name": name, "isthing": i % 2} for i, name in enumerate(NAMES)]
    path = tmp_path / "panoptic_val2017.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    _, metadata = convert_to_file(src, "detectron2", config, tmp_path / "a.safetensors", classes=path)
    by_id = sorted(categories, key=lambda c: c["id"])
    assert json.loads(metadata["categories"]) == by_id
    classes = class_info(metadata, 5, "model.safetensors")
    assert classes.category_ids == [c["id"] for c in by_id] and classes.names == [c["name"] for c in by_id]
    _, metadata = convert_to_file(src, "detectron2", config, tmp_path / "b.safetensors", classes=NAMES)
    assert "categories" not in metadata and class_info(metadata, 5, "model.safetensors").category_ids is None


def test_classes_from_a_coco_annotation_file(tmp_path):
    categories = [  # out of id order; the contiguous order is by id, as in training
        {"id": 92, "name": "sky", "isthing": 0},
        {"id": 1, "name": "cat", "isthing": 1},
        {"id": 17, "name": "dog", "isthing": 1},
    ]
    path = tmp_path / "panoptic_val2017.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    assert resolve_classes(path) == (["cat", "dog", "sky"], [0, 1])
    instances = tmp_path / "instances.json"  # no isthing: every class is a thing
    instances.write_text(json.dumps({"categories": [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}]}))
    assert resolve_classes(str(instances)) == (["person", "car"], [0, 1])
    names = tmp_path / "names.json"
    names.write_text(json.dumps(NAMES))
    assert resolve_classes(names) == (NAMES, None)


def test_classes_from_ade20k_panoptic_and_instance_files(tmp_path):
    """ADE20K's panoptic categories (ids from 0) give the panoptic model's names and things; its instance
    categories, the 100 thing classes, the instance model's."""
    from m2f.data import SYNTHETIC_CATEGORIES, make_synthetic_ade20k

    root = make_synthetic_ade20k(str(tmp_path), num_train=0, num_val=1, image_size=32)
    names = [c["name"] for c in SYNTHETIC_CATEGORIES]
    things = [i for i, c in enumerate(SYNTHETIC_CATEGORIES) if c["isthing"]]
    assert resolve_classes(f"{root}/ade20k_panoptic_val.json") == (names, things)
    assert resolve_classes(f"{root}/ade20k_instance_val.json") == ([names[i] for i in things], [0, 1, 2])


def test_classes_cityscapes():
    """Cityscapes' 19 classes in train id order, the eight from person on things, and their label ids as the
    categories predict writes and eval maps by."""
    from m2f.convert import _resolve_classes

    (names, things), categories = _resolve_classes("cityscapes")
    assert len(names) == 19 and names[0] == "road" and names[11:13] == ["person", "rider"]
    assert things == list(range(11, 19))
    assert [c["id"] for c in categories][:5] == [7, 8, 11, 12, 13] and categories[-1]["id"] == 33
    # the instance models' 8 classes: those things, with the same ids
    (instance_names, instance_things), instance_categories = _resolve_classes("cityscapes-instance")
    assert instance_names == names[11:] and instance_things == list(range(8))
    assert instance_categories == categories[11:]


def test_classes_mapillary():
    """Mapillary Vistas' 65 classes with their panoptic category ids (class + 1) and things."""
    from m2f.convert import _resolve_classes

    (names, things), categories = _resolve_classes("mapillary")
    assert len(names) == 65 and names[19] == "Person" and names[-1] == "Ego Vehicle"
    assert 19 in things and 13 not in things and len(things) == 37  # Person a thing, Road not
    assert [c["id"] for c in categories] == list(range(1, 66))


def test_classes_ade20k():
    from m2f.data.ade20k import ADE20K_CLASS_NAMES

    names, things = resolve_classes("ade20k")
    assert names == list(ADE20K_CLASS_NAMES) and len(names) == 150
    assert things == []


@pytest.mark.parametrize(
    ("classes", "error", "message"),
    [
        ("coco-panoptic", ValueError, "annotation file"),
        ("ade20k-panoptic", ValueError, "pass e.g. ADEChallengeData2016/ade20k_panoptic_val.json"),
        ("ade20k-instance", ValueError, "ids 0-149, things marked"),
        ("no/such/file.txt", ValueError, "no such file"),
        (["a", ""], ValueError, "non-empty name"),
        ([], ValueError, "non-empty name"),
        (5, TypeError, "classes must be"),
        ([1, 2], TypeError, "classes must be"),
    ],
)
def test_bad_classes(classes, error, message):
    with pytest.raises(error, match=message):
        resolve_classes(classes)


def test_bad_classes_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="invalid JSON"):
        resolve_classes(broken)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"categories": [{"name": "no id"}]}))
    with pytest.raises(ValueError, match="categories"):
        resolve_classes(other)


def test_write_is_atomic(resnet, tmp_path, monkeypatch):
    config, state = resnet
    src = hf_directory(tmp_path / "hf", config, state, dict(enumerate(NAMES)))
    out = tmp_path / "out" / "converted.safetensors"
    convert_to_file(src, "transformers", config, out)
    before = out.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_to_file(src, "transformers", config, out, classes=[n.upper() for n in NAMES])
    assert out.read_bytes() == before
    assert os.listdir(out.parent) == [out.name]  # no temporary file left behind
