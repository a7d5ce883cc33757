"""m2f checkpoints written in the transformers, detectron2 and mmdet formats (`m2f convert --to`), read back
by what reads those formats: transformers' `from_pretrained` (its own Mask2Former computes the outputs
compared here) and m2f's importers (tested against the published checkpoints' names elsewhere)."""

import dataclasses
import json

import pytest
import torch
from convert_fixtures import small_config

from m2f import build_model
from m2f.cli import main
from m2f.config import CONFIG_NAMES, BackboneConfig, get_config
from m2f.convert import (
    TRANSFORMERS_FILES,
    ConversionError,
    convert_checkpoint,
    convert_to_file,
    export_checkpoint,
    export_to_file,
    save,
)
from m2f.convert.transformers import transformers_model_config, transformers_unused_tensors
from m2f.engine import checkpoint as ckpt

NAMES = ["cat", "sky", "dog", "road", "car"]  # small_config has 5 classes
THINGS = [0, 2, 4]
# sizes at which transformers' Swin windows match m2f's (every stage a multiple of the window of 2)
SIZES = {"resnet": [(64, 96), (96, 64)], "swin": [(128, 192)]}


def _trained_like_state(config) -> dict[str, torch.Tensor]:
    """A model's initial weights with BatchNorm statistics and deformable offsets moved off their starting
    values, so that a mix-up in them changes the outputs."""
    torch.manual_seed(0)
    state = build_model(config, backend="torch").state_dict()
    generator = torch.Generator().manual_seed(1)
    for key, tensor in state.items():
        if key.endswith(("running_mean", "bias")) and "backbone" in key and tensor.is_floating_point():
            state[key] = torch.rand(tensor.shape, generator=generator) - 0.5
        elif key.endswith("running_var") or (
            key.endswith(".weight") and tensor.ndim == 1 and "backbone" in key
        ):
            state[key] = torch.rand(tensor.shape, generator=generator) + 0.5
        elif "sampling_offsets.weight" in key or "attention_weights.weight" in key:
            state[key] = torch.randn(tensor.shape, generator=generator) * 0.2
    return state


def _write_checkpoint(path, config, state, names=NAMES, things=THINGS):
    metadata = {"config": json.dumps(config.to_dict())}
    if names is not None:
        metadata["class_names"] = json.dumps(names)
    if things is not None:
        metadata["thing_classes"] = json.dumps(things)
    save(state, path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def exported(backbone_kind, tmp_path_factory):
    """(kind, config, state, m2f checkpoint, transformers directory written by `m2f convert --to`)."""
    folder = tmp_path_factory.mktemp(f"export-{backbone_kind}")
    config = small_config(backbone_kind)
    state = _trained_like_state(config)
    checkpoint = _write_checkpoint(folder / "model.safetensors", config, state)
    directory = folder / "hf"
    assert main(["convert", str(checkpoint), "--to", "transformers", "--out", str(directory)]) == 0
    return backbone_kind, config, state, checkpoint, directory


def test_transformers_loads_the_directory_and_computes_the_same(exported):
    transformers = pytest.importorskip("transformers")
    kind, config, state, _, directory = exported
    assert sorted(path.name for path in directory.iterdir()) == sorted(TRANSFORMERS_FILES)
    hf, info = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(
        directory, output_loading_info=True
    )
    assert {key: sorted(value) for key, value in info.items()} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    assert hf.config.id2label == dict(enumerate(NAMES))
    ours = build_model(config, backend="torch")
    ours.load_state_dict(state)
    ours, hf = ours.double().eval(), hf.double().eval()
    for height, width in SIZES[kind]:
        images = torch.rand(
            2, 3, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
        )
        images = images * 255
        with torch.no_grad():
            expected = hf(pixel_values=(images - ours.pixel_mean) / ours.pixel_std)
            actual = ours(images)
        # float64 on both sides, but m2f builds its position encodings and reference points in float32, as
        # Mask2Former does, where transformers builds them in the input's dtype
        torch.testing.assert_close(actual["pred_logits"], expected.class_queries_logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(actual["pred_masks"], expected.masks_queries_logits, rtol=1e-6, atol=1e-6)


def test_the_image_processor_normalizes_like_m2f(exported):
    transformers = pytest.importorskip("transformers")
    _, config, _, _, directory = exported
    processor = transformers.AutoImageProcessor.from_pretrained(directory)
    assert processor.size == {
        "shortest_edge": config.inference.test_short_edge,
        "longest_edge": config.inference.test_max_size,
    }
    assert processor.size_divisor == config.size_divisibility
    image = torch.randint(0, 256, (64, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    pixels = processor(images=image.numpy(), do_resize=False, return_tensors="pt").pixel_values
    expected = (
        image.permute(2, 0, 1).double() - torch.tensor(config.pixel_mean).view(3, 1, 1)
    ) / torch.tensor(config.pixel_std).view(3, 1, 1)
    torch.testing.assert_close(pixels[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_a_directory_being_rewritten_has_no_config_until_its_weights_are_in(exported, tmp_path, monkeypatch):
    """An export that fails between removing the old config.json and writing the new one leaves a folder
    that from_pretrained refuses, not new weights under an old config."""
    import m2f.convert

    _, _, _, checkpoint, _ = exported
    directory = tmp_path / "hf"
    export_to_file(checkpoint, "transformers", directory)
    assert (directory / "config.json").is_file()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(m2f.convert, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        export_to_file(checkpoint, "transformers", directory)
    assert not (directory / "config.json").exists()


def test_the_directory_converts_back_to_the_same_weights_and_names(exported, tmp_path):
    _, config, state, _, directory = exported
    back, metadata = convert_to_file(directory, "transformers", config, tmp_path / "back.safetensors")
    assert json.loads(metadata["class_names"]) == NAMES
    assert back.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("fmt", ["detectron2", "mmdet"])
def test_detectron2_and_mmdet_files_convert_back(fmt, exported, tmp_path):
    _, config, state, checkpoint, _ = exported
    suffix = {"detectron2": ".pkl", "mmdet": ".pth"}[fmt]
    out = tmp_path / f"exported{suffix}"
    assert main(["convert", str(checkpoint), "--to", fmt, "--out", str(out)]) == 0
    back, metadata = convert_to_file(out, fmt, config, tmp_path / "back.safetensors")
    assert back.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key
    if fmt == "mmdet":  # detectron2 files carry no class names
        assert json.loads(metadata["class_names"]) == NAMES
        assert json.loads(metadata["thing_classes"]) == THINGS
    else:
        assert "class_names" not in metadata


def _basic_block_resnet():
    return dataclasses.replace(
        get_config("panoptic-r50"), backbone=BackboneConfig("resnet18", frozen_batchnorm=True)
    )


@pytest.mark.parametrize(
    "make_config",
    [
        pytest.param(lambda name=name: get_config(name), id=name)
        for name in CONFIG_NAMES
        if name != "demo-tiny"
    ]
    + [pytest.param(_basic_block_resnet, id="resnet18")],
)
def test_every_config_gets_a_transformers_model_of_the_written_weights(make_config):
    """config.json read from the weights builds a transformers model that holds exactly the tensors written,
    at their shapes (built on the meta device: nothing allocated)."""
    transformers = pytest.importorskip("transformers")
    config = make_config()
    with torch.device("meta"):
        ours = build_model(config, backend="torch")
    weights = export_checkpoint(ours.state_dict(), "transformers", config)
    weights.update(transformers_unused_tensors(config, weights))
    model_config = transformers.Mask2FormerConfig.from_dict(transformers_model_config(config, weights))
    with torch.device("meta"):
        hf = transformers.Mask2FormerForUniversalSegmentation(model_config)
    expected = {key: tuple(tensor.shape) for key, tensor in hf.state_dict().items()}
    assert {key: tuple(tensor.shape) for key, tensor in weights.items()} == expected
    assert model_config.num_labels == config.num_classes
    assert model_config.decoder_layers == config.decoder.num_layers + 1


def _with(config, **changes):
    sections = {}
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        sections.setdefault(section, {})[field] = value
    return dataclasses.replace(
        config,
        **{
            section: dataclasses.replace(getattr(config, section), **fields)
            for section, fields in sections.items()
        },
    )


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"pixel_decoder__encoder_heads": 2}, "pixel_decoder.encoder_heads=2 and decoder.num_heads=4"),
        ({"pixel_decoder__encoder_points": 2}, "encoder_points=2"),
        ({"decoder__mask_threshold": 0.6}, "decoder.mask_threshold=0.6"),
        ({"pixel_decoder__transformer_strides": (4, 8, 16)}, "transformer_strides=(4, 8, 16)"),
    ],
)
def test_a_model_transformers_cannot_compute_is_refused_before_writing(changes, named, tmp_path):
    config = _with(small_config("resnet"), **changes)
    checkpoint = _write_checkpoint(tmp_path / "model.safetensors", config, _trained_like_state(config))
    with pytest.raises(ConversionError, match=named.replace("(", r"\(").replace(")", r"\)")):
        export_to_file(checkpoint, "transformers", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    config = small_config("resnet")
    checkpoint = _write_checkpoint(tmp_path / "model.safetensors", config, _trained_like_state(config))
    wider = _with(config, decoder__ffn_dim=256)
    with pytest.raises(ConversionError, match=r"does not fit the model.*shape mismatches"):
        export_to_file(checkpoint, "mmdet", tmp_path / "out.pth", config_name=wider)
    assert not (tmp_path / "out.pth").exists()


def test_export_needs_a_config_and_the_format_s_file_name(tmp_path):
    config = small_config("resnet")
    state = _trained_like_state(config)
    bare = tmp_path / "bare.safetensors"
    save(state, bare)
    with pytest.raises(ValueError, match="stores no config"):
        export_to_file(bare, "detectron2", tmp_path / "out.pkl")
    checkpoint = _write_checkpoint(tmp_path / "model.safetensors", config, state)
    with pytest.raises(ValueError, match=r"out must be a \.pkl file for detectron2"):
        export_to_file(checkpoint, "detectron2", tmp_path / "out.pth")
    with pytest.raises(ValueError, match=r"out must be a \.pth file for mmdet"):
        export_to_file(checkpoint, "mmdet", tmp_path / "out.pkl")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; expected a folder"):
        export_to_file(checkpoint, "transformers", tmp_path / "file")
    assert ckpt.read_header(checkpoint)[0]["class_names"] == json.dumps(NAMES)  # the input is untouched


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--format", "mmdet", "--to", "mmdet", "--config", "demo-tiny"], "give --format"),
        ([], "give --format"),
        (["--format", "mmdet"], "--format needs --config"),
        (["--to", "mmdet", "--classes", "ade20k"], "--classes applies to --format"),
    ],
)
def test_convert_command_line_directions(arguments, message, tmp_path, capsys):
    source = tmp_path / "model.pth"
    source.write_bytes(b"")
    assert main(["convert", str(source), *arguments, "--out", str(tmp_path / "out.pth")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


def test_convert_round_trip_with_an_unnamed_checkpoint_gives_placeholder_labels(tmp_path):
    """A checkpoint without class names gets transformers' own placeholders, which read back as none."""
    transformers = pytest.importorskip("transformers")
    config = small_config("resnet")
    state = _trained_like_state(config)
    checkpoint = _write_checkpoint(tmp_path / "model.safetensors", config, state, names=None, things=None)
    export_to_file(checkpoint, "transformers", tmp_path / "hf")
    model_config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert model_config.id2label == {i: f"LABEL_{i}" for i in range(config.num_classes)}
    _, metadata = convert_to_file(tmp_path / "hf", "transformers", config, tmp_path / "back.safetensors")
    assert "class_names" not in metadata
    assert convert_checkpoint(tmp_path / "hf", "transformers", config).keys() == state.keys()
