"""m2f.config.load_config and apply_overrides: configs from JSON files and fields set by dotted name."""

import dataclasses
import json

import pytest
import torch

import m2f
from m2f.config import ModelConfig, apply_overrides, get_config, load_config


def test_overrides_set_the_fields_they_name_and_nothing_else():
    base = get_config("panoptic-r50")
    overridden = apply_overrides(
        base,
        [
            "solver.lr=2e-4",
            "solver.max_iter=3000",
            "solver.lr_steps=[1000, 2000]",
            "decoder.num_queries=200",
            "decoder.pre_norm=true",
            "task=semantic",  # a text field takes plain text
            "name=123",  # ... and keeps digits as text
            "backbone.timm_kwargs.drop_path_rate=0.2",  # a free dict takes new keys
            "pixel_mean=[1, 2, 3]",
            "loss.num_points=64",
            "loss.num_points=128",  # the last one wins
        ],
    )
    expected = dataclasses.replace(
        base,
        task="semantic",
        name="123",
        backbone=dataclasses.replace(base.backbone, timm_kwargs={"drop_path_rate": 0.2}),
        decoder=dataclasses.replace(base.decoder, num_queries=200, pre_norm=True),
        loss=dataclasses.replace(base.loss, num_points=128),
        solver=dataclasses.replace(base.solver, lr=2e-4, max_iter=3000, lr_steps=(1000, 2000)),
        pixel_mean=(1.0, 2.0, 3.0),
    )
    assert overridden == expected
    assert isinstance(overridden.pixel_mean[0], float) and isinstance(overridden.solver.lr_steps, tuple)
    assert base == get_config("panoptic-r50")  # the input is left as it was
    assert apply_overrides(base, []) == base
    assert apply_overrides(base, ['name="quoted"']).name == "quoted"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("solver.lr", r"an override must be FIELD=VALUE \(e.g. solver.lr=2e-4\), got 'solver.lr'"),
        ("=3", "an override must be FIELD=VALUE"),
        ("nosuch=1", "nosuch: ModelConfig has no field 'nosuch'; its fields: name, task, dataset"),
        ("decoder.heads=4", "decoder.heads: DecoderConfig has no field 'heads'; its fields: hidden_dim"),
        ("nosuch.lr=1", "nosuch: ModelConfig has no field 'nosuch'"),
        ("solver=1", r"solver is a group of fields: set one of them \(solver.FIELD=VALUE\)"),
        ("solver.lr.x=1", "solver.lr is not a group of fields"),
        ("solver.lr=fast", "config.solver.lr must be of type float, got 'fast'"),
        ("decoder.num_queries=2.5", "config.decoder.num_queries must be of type int, got 2.5"),
        ("decoder.pre_norm=True", "config.decoder.pre_norm must be of type bool, got 'True'"),
        ("decoder.num_queries=0", "decoder.num_queries must be >= 1, got 0"),
        ("task=bogus", "task must be one of"),
        # A shorter run whose lr steps stay where the long one had them would never lower its lr.
        (
            "solver.max_iter=5000",
            r"solver.lr_steps must be in increasing order, each from 0 to solver.max_iter",
        ),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_config("panoptic-r50"), [override])


@pytest.mark.parametrize(
    ("solver", "message"),
    [
        ({"max_iter": 0, "lr_steps": []}, "solver.max_iter must be >= 1, got 0"),
        ({"batch_size": 0}, "solver.batch_size must be >= 1, got 0"),
        ({"image_size": 0}, "solver.image_size must be >= 1, got 0"),
        ({"lr_schedule": "cosine"}, "solver.lr_schedule must be 'step' or 'poly', got 'cosine'"),
        ({"lr_steps": [350312, 331875]}, r"solver.lr_steps must be in increasing order.*\(350312, 331875\)"),
        ({"lr_steps": [-1]}, r"each from 0 to solver.max_iter \(368750\), got \(-1,\)"),
        ({"min_scale": 0.0}, "solver.min_scale and solver.max_scale must be positive"),
        ({"min_scale": 2.5}, r"min_scale <= max_scale, got 2.5 and 2.0"),
        ({"crop_aspect": 0.0}, r"solver.crop_aspect must be positive .*got 0.0"),
        ({"crop_aspect": 3000.0}, r"leave crops of at least one pixel, got 3000.0 \(crops of 1024 x 0\)"),
        ({"resize_base": 0.0}, "solver.resize_base must be positive, got 0.0"),
        ({"resize_base": float("inf")}, "solver.resize_base must be positive, got inf"),
    ],
)
def test_solver_settings_are_checked_with_the_config(solver, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**get_config("panoptic-r50").to_dict(), "solver": solver})


def test_crop_aspect_keeps_the_long_side():
    crop_sizes = [
        apply_overrides(get_config("panoptic-r50"), [f"solver.crop_aspect={aspect}"]).solver.crop_size
        for aspect in (1.0, 0.5, 2.0, 0.75, 2000.0)
    ]
    assert crop_sizes == [(1024, 1024), (512, 1024), (1024, 512), (768, 1024), (1024, 1)]


def test_load_config_reads_names_json_files_and_config_objects(tmp_path):
    config = apply_overrides(get_config("demo-tiny"), ["decoder.num_queries=8", "solver.lr_steps=[10]"])
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(path) == config
    assert load_config(str(path)) == config
    assert load_config(config) is config
    assert load_config("demo-tiny") == get_config("demo-tiny")
    with torch.device("meta"):
        model = m2f.build_model(path)
    assert model.transformer_decoder.query_embed.weight.shape[0] == 8


def test_load_config_errors_name_the_file_or_list_the_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config name 'panoptic-r5'; available: panoptic-r50, "):
        load_config("panoptic-r5")
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        load_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=f"{broken}: Expecting property name"):
        load_config(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"decoder": {"num_queries": "many"}}))
    with pytest.raises(ValueError, match=f"{wrong}: config.decoder.num_queries must be of type int"):
        load_config(wrong)
    with pytest.raises(TypeError, match="config must be a name, a path or a ModelConfig, got int"):
        load_config(5)
    with pytest.raises(TypeError, match="name_or_config must be a config name, a JSON file or a ModelConfig"):
        m2f.build_model(5)
