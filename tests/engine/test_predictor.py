"""m2f.Predictor: a checkpoint's model segmenting single images in Python."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import m2f
from m2f.engine import checkpoint as ckpt

CLASS_NAMES = ["disc", "square", "triangle", "sky", "grass", "road"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """demo-tiny (test size 128) with random weights whose class and mask logits are scaled up, so that the
    predictions are not one class everywhere."""
    config = m2f.get_config("demo-tiny")
    torch.manual_seed(1)
    model = m2f.build_model(config).eval()
    with torch.no_grad():
        model.transformer_decoder.class_embed.weight.mul_(100)
        model.transformer_decoder.mask_embed.layers[-1].weight.mul_(100)
    path = tmp_path_factory.mktemp("predictor") / "model.safetensors"
    metadata = {"config": json.dumps(config.to_dict()), "class_names": json.dumps(CLASS_NAMES)}
    metadata["thing_classes"] = json.dumps([0, 1, 2])
    ckpt.save_weights(path, model, metadata)
    return path


def scene(size: int) -> np.ndarray:
    """A synthetic scene of shapes on textures, (size, size, 3) uint8."""
    from m2f.data.synthetic import draw_scene

    return draw_scene(np.random.default_rng(1), size)[0]


def assert_same_predictions(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for task in first:
        if task == "panoptic":
            assert torch.equal(first[task][0], second[task][0]) and first[task][1] == second[task][1]
        elif task == "instance":
            assert first[task].keys() == second[task].keys()
            assert all(torch.equal(first[task][key], second[task][key]) for key in first[task])
        else:
            assert torch.equal(first[task], second[task])


def test_every_image_form_gives_the_same_predictions_at_the_image_size(checkpoint, tmp_path):
    predictor = m2f.Predictor(checkpoint, device="cpu")
    assert predictor.classes.names == CLASS_NAMES and predictor.classes.things == {0, 1, 2}
    assert not predictor.model.training and predictor.config.num_classes == len(CLASS_NAMES)
    pixels = np.ascontiguousarray(scene(128)[20:120, 30:90])  # 100 x 60, tested at 128 x 77
    Image.fromarray(pixels).save(tmp_path / "image.png")
    tasks = ["panoptic", "instance", "semantic"]
    from_path = predictor(tmp_path / "image.png", tasks)
    assert from_path["panoptic"][0].shape == from_path["semantic"].shape == (100, 60)
    assert from_path["instance"]["masks"].shape[1:] == (100, 60)
    assert from_path["semantic"].unique().numel() > 1 and from_path["panoptic"][1]
    for image in (
        str(tmp_path / "image.png"),
        Image.fromarray(pixels),
        pixels,
        torch.from_numpy(pixels).permute(2, 0, 1),
    ):
        assert_same_predictions(predictor(image, tasks), from_path)
    gray = np.ascontiguousarray(np.repeat(pixels[..., :1], 3, axis=2))  # a one-channel image, as RGB
    assert_same_predictions(predictor(Image.fromarray(pixels[..., 0]), tasks), predictor(gray, tasks))
    assert list(predictor(pixels)) == ["panoptic"]  # the config's task
    assert list(predictor(pixels, ["semantic", "semantic", "instance"])) == ["semantic", "instance"]


def test_semantic_map_is_mask2formers_semantic_inference(checkpoint):
    """At the test size (128 x 128, a multiple of 32: no resize, no padding) the class map is the argmax of
    softmax(class logits) without no-object times sigmoid(masks upsampled 4x), computed here from the model's
    raw outputs."""
    predictor = m2f.Predictor(checkpoint, device="cpu")
    pixels = scene(128)
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    with torch.no_grad():
        outputs = predictor.model(image[None].float())
    masks = F.interpolate(outputs["pred_masks"], size=(128, 128), mode="bilinear", align_corners=False)[0]
    scores = torch.einsum("qc,qhw->chw", outputs["pred_logits"][0].softmax(-1)[:, :-1], masks.sigmoid())
    predicted = predictor(image, ["semantic"])["semantic"]
    assert predicted.unique().numel() > 1
    assert (predicted == scores.argmax(0)).float().mean() > 0.999  # ties and rounding may flip a pixel


def test_bad_input_is_named(checkpoint, tmp_path):
    predictor = m2f.Predictor(checkpoint, device="cpu")
    for image, described in (
        (np.zeros((8, 8, 3), np.float32), r"got a \(8, 8, 3\) float32 ndarray"),
        (np.zeros((8, 8), np.uint8), r"got a \(8, 8\) uint8 ndarray"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), r"got a \(8, 8, 3\) torch.uint8 Tensor"),
        (5, "got a int"),
    ):
        with pytest.raises(ValueError, match=r"image must be a path, a PIL image, .*" + described):
            predictor(image)
    with pytest.raises(ValueError, match="cannot read image"):
        predictor(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="tasks must be a sequence of task names, got the string 'semantic'"):
        predictor(np.zeros((8, 8, 3), np.uint8), "semantic")
    with pytest.raises(ValueError, match=r"tasks must be among .*, got \['depth'\]"):
        predictor(np.zeros((8, 8, 3), np.uint8), ["depth"])
    with pytest.raises(ValueError, match="tta: the multi-scale and flip test is for the semantic task alone"):
        predictor(np.zeros((8, 8, 3), np.uint8), ["panoptic"], tta=True)
    with pytest.raises(ValueError, match="amp must be None or one of"):
        m2f.Predictor(checkpoint, device="cpu", amp="fp8")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint file not found"):
        m2f.Predictor(tmp_path / "none.safetensors")


def test_frozen_norms_are_folded_into_the_convs_with_the_same_outputs(tmp_path):
    """A ResNet with frozen norms (the COCO configs) predicts with them folded into its convs (the state dict
    changes, so only the Predictor's model is folded): only the norm after the deep stem's Sequential is left,
    and the raw outputs are those of the checkpoint's model."""
    import dataclasses

    from m2f.models.backbone import FrozenBatchNorm2d

    config = m2f.get_config("demo-tiny")
    config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, frozen_batchnorm=True))
    torch.manual_seed(2)
    model = m2f.build_model(config).eval()
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.normal_()
            norm.bias.normal_()
    path = tmp_path / "frozen.safetensors"
    ckpt.save_weights(path, model, {"config": json.dumps(config.to_dict())})
    predictor = m2f.Predictor(path, device="cpu")

    def frozen_norms(module):
        return sum(isinstance(m, FrozenBatchNorm2d) for m in module.modules())

    assert frozen_norms(model) == 15 and frozen_norms(predictor.model) == 1
    image = torch.from_numpy(scene(128)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        expected, outputs = model(image), predictor.model(image)
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(outputs[key], expected[key], rtol=1e-4, atol=1e-4)


def test_bfloat16_autocast_on_the_cpu_predicts_what_float32_does(checkpoint):
    """amp="bf16" on the CPU runs the model under torch.autocast("cpu"): its mask logits differ from float32's
    by bfloat16 rounding, and its class map only at pixels near a decision boundary."""
    from m2f.engine.evaluate import predict_masks

    predictors = {amp: m2f.Predictor(checkpoint, device="cpu", amp=amp) for amp in (None, "bf16")}
    image = torch.from_numpy(scene(128)).permute(2, 0, 1)
    outputs = {
        amp: predict_masks(predictor.model, image, device=torch.device("cpu"), amp=amp)
        for amp, predictor in predictors.items()
    }
    full, half = (outputs[amp][1].at((128, 128)) for amp in (None, "bf16"))
    error = (half - full).abs().mean() / full.abs().mean()  # 3 % in this random model
    assert 0 < error < 0.1
    maps = {amp: predictor(image, ["semantic"])["semantic"] for amp, predictor in predictors.items()}
    assert maps[None].unique().numel() > 1
    assert (maps["bf16"] == maps[None]).float().mean() > 0.99
