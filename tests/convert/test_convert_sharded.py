"""Sharded Hugging Face checkpoints (model.safetensors.index.json / pytorch_model.bin.index.json)."""

import json

import pytest
import torch
from convert_fixtures import random_state, small_config
from safetensors.torch import save_file

from m2f.convert import ConversionError, convert_checkpoint, export_checkpoint

SUFFIX = {"safetensors": ".safetensors", "bin": ".bin"}
INDEX = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}
SINGLE = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}


def write_tensors(tensors, path, kind):
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)


def write_sharded(tensors, folder, kind, num_shards=3):
    """Writes transformers' sharded layout: model-0000i-of-0000n files and the index; returns the shards
    as {file name: keys}."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    shards = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}{SUFFIX[kind]}"
        shards[name] = keys[i::num_shards]  # interleaved, so every shard mixes backbone and head keys
        write_tensors({k: tensors[k] for k in shards[name]}, folder / name, kind)
    write_index(folder / INDEX[kind], {key: name for name, names in shards.items() for key in names})
    return shards


def write_index(path, weight_map):
    path.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def resnet_export():
    config = small_config("resnet")
    state = random_state(config)
    return config, state, export_checkpoint(state, "transformers", config)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_equals_single_file(small_model_state, kind, tmp_path):
    config, state = small_model_state
    exported = export_checkpoint(state, "transformers", config)
    write_tensors(exported, tmp_path / SINGLE[kind], kind)
    shards = write_sharded(exported, tmp_path / "sharded", kind)
    assert len(shards) == 3 and all(shards.values())

    single = convert_checkpoint(tmp_path / SINGLE[kind], "transformers", config)
    for src in (tmp_path / "sharded", tmp_path / "sharded" / INDEX[kind]):
        sharded = convert_checkpoint(src, "transformers", config)
        assert sharded.keys() == single.keys() == state.keys()
        for key, tensor in single.items():
            assert torch.equal(sharded[key], tensor), key
            assert torch.equal(sharded[key], state[key]), key


def test_directory_prefers_the_single_safetensors_file(resnet_export, tmp_path):
    config, state, exported = resnet_export
    save_file(exported, str(tmp_path / "model.safetensors"))
    # an index whose shards are absent: choosing it would fail
    write_index(tmp_path / INDEX["safetensors"], dict.fromkeys(exported, "model-00001-of-00002.safetensors"))
    converted = convert_checkpoint(tmp_path, "transformers", config)
    assert all(torch.equal(converted[k], v) for k, v in state.items())


def test_missing_shard_names_the_index(resnet_export, tmp_path):
    config, _, exported = resnet_export
    shards = write_sharded(exported, tmp_path, "safetensors")
    gone = sorted(shards)[1]
    (tmp_path / gone).unlink()
    with pytest.raises(FileNotFoundError) as error:
        convert_checkpoint(tmp_path, "transformers", config)
    assert str(tmp_path / INDEX["safetensors"]) in str(error.value) and gone in str(error.value)


def test_key_missing_from_its_shard(resnet_export, tmp_path):
    config, _, exported = resnet_export
    shards = write_sharded(exported, tmp_path, "bin")
    name = sorted(shards)[2]
    dropped = shards[name][0]
    kept = {k: exported[k] for k in shards[name][1:]}
    write_tensors(kept, tmp_path / name, "bin")
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(tmp_path, "transformers", config)
    message = str(error.value)
    assert INDEX["bin"] in message and name in message and dropped in message


def test_key_in_two_shards(resnet_export, tmp_path):
    config, _, exported = resnet_export
    shards = write_sharded(exported, tmp_path, "safetensors")
    first, second = sorted(shards)[:2]
    extra = shards[first][0]
    write_tensors(
        {**{k: exported[k] for k in shards[second]}, extra: exported[extra]}, tmp_path / second, "safetensors"
    )
    with pytest.raises(ConversionError, match="stored in two shards") as error:
        convert_checkpoint(tmp_path, "transformers", config)
    assert f"{extra} ({first}, {second})" in str(error.value)


def test_key_in_no_index_entry(resnet_export, tmp_path):
    config, _, exported = resnet_export
    write_sharded(exported, tmp_path, "safetensors", num_shards=2)
    index = json.loads((tmp_path / INDEX["safetensors"]).read_text())
    unlisted = next(iter(index["weight_map"]))
    del index["weight_map"][unlisted]
    (tmp_path / INDEX["safetensors"]).write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="in shards but not in the index") as error:
        convert_checkpoint(tmp_path, "transformers", config)
    assert unlisted in str(error.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a JSON shard index"),
        (json.dumps({"metadata": {}}), 'no "weight_map"'),
        (json.dumps({"weight_map": {"a.weight": 3}}), 'no "weight_map"'),
        (
            json.dumps({"weight_map": {"a.weight": "../model-00001-of-00001.safetensors"}}),
            "file names in its",
        ),
    ],
)
def test_bad_index(content, message, tmp_path):
    (tmp_path / INDEX["safetensors"]).write_text(content)
    with pytest.raises(ConversionError, match=message) as error:
        convert_checkpoint(tmp_path, "transformers", small_config("resnet"))
    assert str(tmp_path / INDEX["safetensors"]) in str(error.value)


def test_empty_directory_lists_what_it_looks_for(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        convert_checkpoint(tmp_path, "transformers", small_config("resnet"))
    assert all(name in str(error.value) for name in (*SINGLE.values(), *INDEX.values()))
