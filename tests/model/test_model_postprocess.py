"""Post-processing on hand-made predictions with hand-derived expected results."""

import math

import pytest
import torch
import torch.nn.functional as F

from m2f.models.postprocess import (
    ImageMasks,
    instance_inference,
    masks_to_boxes,
    panoptic_inference,
    resize_masks,
    semantic_inference,
)

ON, OFF = 10.0, -10.0


def class_logits(probabilities):
    """Logits whose softmax is exactly the given rows of probabilities."""
    return torch.tensor(probabilities, dtype=torch.float64).log().float()


def mask_from_pixels(height, width, pixels):
    mask = torch.full((height, width), OFF)
    for y, x in pixels:
        mask[y, x] = ON
    return mask


def block(rows, cols):
    return [(y, x) for y in rows for x in cols]


def at_image_size(mask_pred):
    """mask_pred (Q, H, W) as predict_masks' ImageMasks of an unpadded image whose masks are at its size."""
    size = tuple(mask_pred.shape[-2:])
    return ImageMasks(mask_pred, size, size)


def test_panoptic_thresholds_overlap_and_stuff_merging():
    # Classes: 0 and 1 are things, 2 is stuff; column 3 of mask_cls is "no object". Image 4 x 6.
    height, width = 4, 6
    queries = [
        ([0.90, 0.04, 0.03, 0.03], block(range(4), range(2))),  # q0: thing 0, left two columns
        ([0.02, 0.01, 0.95, 0.02], block(range(2), range(2, 4))),  # q1: stuff 2, top right block
        ([0.05, 0.05, 0.85, 0.05], block(range(2, 4), range(2, 4))),  # q2: stuff 2 again -> merged into q1
        ([0.10, 0.70, 0.10, 0.10], block(range(4), range(6))),  # q3: best score 0.7 <= 0.8 -> dropped
        ([0.02, 0.04, 0.04, 0.90], block(range(4), range(6))),  # q4: no object -> dropped
        ([0.05, 0.85, 0.05, 0.05], block(range(4), range(2))),  # q5: loses every pixel to q0 -> dropped
        ([0.82, 0.06, 0.06, 0.06], block(range(4), range(3, 5))),  # q6: keeps 3 of 8 pixels < 0.8 -> dropped
        ([0.05, 0.90, 0.03, 0.02], [(0, 5), (1, 5), (2, 5), (3, 4)]),  # q7: thing 1, keeps all 4 pixels
    ]
    mask_cls = class_logits([p for p, _ in queries])
    mask_pred = torch.stack([mask_from_pixels(height, width, px) for _, px in queries])

    seg, info = panoptic_inference(mask_cls, mask_pred, thing_classes={0, 1})

    expected = torch.tensor(
        [
            [1, 1, 2, 2, 0, 3],
            [1, 1, 2, 2, 0, 3],
            [1, 1, 2, 2, 0, 3],
            [1, 1, 2, 2, 3, 0],
        ],
        dtype=torch.int32,
    )
    assert seg.dtype == torch.int32
    assert torch.equal(seg, expected)
    assert [(s["id"], s["category_id"], s["isthing"]) for s in info] == [
        (1, 0, True),
        (2, 2, False),
        (3, 1, True),
    ]
    assert [s["score"] for s in info] == pytest.approx([0.90, 0.95, 0.90], abs=1e-6)


def test_panoptic_nothing_confident_gives_void():
    mask_cls = class_logits([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])
    mask_pred = torch.full((2, 3, 3), ON)
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_classes={0})
    assert torch.equal(seg, torch.zeros(3, 3, dtype=torch.int32))
    assert info == []


def test_panoptic_overlap_threshold_is_configurable():
    # q1 keeps 3 of its 8 pixels (ratio 0.375): dropped at 0.8, kept at 0.3.
    mask_cls = class_logits([[0.9, 0.05, 0.05], [0.85, 0.1, 0.05]])
    mask_pred = torch.stack(
        [
            mask_from_pixels(2, 4, [*block(range(2), range(2)), (0, 2)]),
            mask_from_pixels(2, 4, block(range(2), range(4))),
        ]
    )
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_classes={0, 1}, overlap_threshold=0.8)
    assert len(info) == 1
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_classes={0, 1}, overlap_threshold=0.3)
    assert len(info) == 2
    assert torch.equal(seg, torch.tensor([[1, 1, 1, 2], [1, 1, 2, 2]], dtype=torch.int32))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def instance_case():
    probs = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.05, 0.05, 0.9]]
    mask_pred = torch.full((3, 4, 4), -3.0)
    mask_pred[0, 0:2, 0:2] = 2.0
    mask_pred[1, 2:4, 1:4] = 1.0
    return class_logits(probs), mask_pred


def test_instance_topk_scores_labels_boxes():
    mask_cls, mask_pred = instance_case()
    result = instance_inference(mask_cls, mask_pred, num_classes=2, top_k=3)
    # Top 3 (query, class) pairs: (0, 0) 0.6, (1, 1) 0.5, (0, 1) 0.3, times the mean mask probability inside.
    expected_scores = [0.6 * sigmoid(2.0), 0.5 * sigmoid(1.0), 0.3 * sigmoid(2.0)]
    assert result["scores"].tolist() == pytest.approx(expected_scores, rel=1e-5)
    assert result["labels"].tolist() == [0, 1, 1]
    assert torch.equal(result["masks"][0], mask_pred[0] > 0)
    assert torch.equal(result["masks"][1], mask_pred[1] > 0)
    assert result["masks"].dtype == torch.bool
    assert result["boxes"].tolist() == [[0, 0, 2, 2], [1, 2, 4, 4], [0, 0, 2, 2]]


def test_instance_thing_filter_and_topk_larger_than_candidates():
    mask_cls, mask_pred = instance_case()
    result = instance_inference(mask_cls, mask_pred, num_classes=2, top_k=3, thing_classes={0})
    assert result["labels"].tolist() == [0]
    assert result["scores"].tolist() == pytest.approx([0.6 * sigmoid(2.0)], rel=1e-5)
    result = instance_inference(mask_cls, mask_pred, num_classes=2, top_k=100)
    assert len(result["scores"]) == 6
    with pytest.raises(ValueError, match="num_classes"):
        instance_inference(mask_cls, mask_pred, num_classes=3)


def test_semantic_is_probability_weighted_sum():
    mask_cls = class_logits([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    mask_pred = torch.tensor([[[2.0, -2.0]], [[-1.0, 3.0]]])
    result = semantic_inference(mask_cls, mask_pred)
    assert result.shape == (2, 1, 2)
    expected = [
        [[0.7 * sigmoid(2) + 0.1 * sigmoid(-1), 0.7 * sigmoid(-2) + 0.1 * sigmoid(3)]],
        [[0.2 * sigmoid(2) + 0.6 * sigmoid(-1), 0.2 * sigmoid(-2) + 0.6 * sigmoid(3)]],
    ]
    assert result.tolist() == [[pytest.approx(row, rel=1e-5) for row in plane] for plane in expected]
    assert result.argmax(0).tolist() == [[0, 1]]


def test_masks_to_boxes_empty_and_single_pixel():
    masks = torch.zeros(4, 5, 7, dtype=torch.bool)
    masks[1, 2, 3] = True
    masks[2, 1:4, 0:7] = True
    masks[3, 0, 0] = True
    assert masks_to_boxes(masks).tolist() == [[0, 0, 0, 0], [3, 2, 4, 3], [0, 1, 7, 4], [0, 0, 1, 1]]
    assert masks_to_boxes(torch.zeros(0, 5, 7, dtype=torch.bool)).shape == (0, 4)


def test_resize_masks_crops_padding_before_resizing():
    # Left half of the 1/4-scale logits positive, right half negative; the image is the left half of the input.
    pred = torch.tensor([[[1.0, 1.0, -1.0, -1.0], [1.0, 1.0, -1.0, -1.0]]])
    cropped = resize_masks(pred, padded_size=(8, 16), image_size=(8, 8), output_size=(4, 4))
    assert cropped.shape == (1, 4, 4)
    assert bool((cropped > 0).all())
    full = resize_masks(pred[None], padded_size=(8, 16), image_size=(8, 16), output_size=(4, 8))
    assert full.shape == (1, 1, 4, 8)
    assert bool((full[..., :4] > 0).all()) and bool((full[..., 4:] < 0).all())


def test_bad_shapes():
    with pytest.raises(ValueError, match="mask_pred"):
        semantic_inference(torch.zeros(3, 4), torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="mask_cls"):
        panoptic_inference(torch.zeros(3), torch.zeros(3, 5, 5), thing_classes=set())
    with pytest.raises(ValueError, match="pred_masks"):
        resize_masks(torch.zeros(5, 5), (8, 8), (8, 8), (4, 4))


def test_engine_postprocess_resizes_in_mask2formers_order():
    """A semantic model's semantic output: class scores at the network input's size, then resized to the output
    size (Mask2Former's semantic default). Everything else, a panoptic model's semantic output included
    (sem_seg_postprocess_before_inference with panoptic_on): the mask logits are resized first. The two orders
    give different maps here."""
    from m2f.config import get_config
    from m2f.engine.evaluate import postprocess

    generator = torch.Generator().manual_seed(0)
    mask_cls = torch.randn(6, 5, generator=generator) * 3
    mask_pred = torch.randn(6, 5, 7, generator=generator) * 4
    output_size = (13, 17)
    semantic_model, panoptic_model = get_config("semantic-ade20k-r50"), get_config("demo-tiny")

    def resized(maps):
        return F.interpolate(maps[None], size=output_size, mode="bilinear", align_corners=False)[0]

    scores_resized = resized(semantic_inference(mask_cls, mask_pred)).argmax(0)
    logits_resized = semantic_inference(mask_cls, resized(mask_pred)).argmax(0)
    assert not torch.equal(scores_resized, logits_resized)
    semantic = postprocess(
        ["semantic"], mask_cls, at_image_size(mask_pred), output_size, semantic_model, set()
    )
    assert torch.equal(semantic["semantic"], scores_resized)
    semantic = postprocess(
        ["semantic"], mask_cls, at_image_size(mask_pred), output_size, panoptic_model, set()
    )
    assert torch.equal(semantic["semantic"], logits_resized)
    panoptic = postprocess(
        ["panoptic"], mask_cls, at_image_size(mask_pred), output_size, panoptic_model, {0, 1}
    )
    panoptic_seg, segments = panoptic["panoptic"]
    expected_seg, expected_segments = panoptic_inference(mask_cls, resized(mask_pred), {0, 1})
    assert torch.equal(panoptic_seg, expected_seg) and segments == expected_segments
    with pytest.raises(ValueError, match="task must be"):
        postprocess(
            ["panoptic", "depth"], mask_cls, at_image_size(mask_pred), output_size, panoptic_model, set()
        )
    with pytest.raises(TypeError, match="sequence of task names"):
        postprocess("panoptic", mask_cls, at_image_size(mask_pred), output_size, panoptic_model, set())


def predicted_masks(seed: int, queries: int = 6):
    """Class logits (queries, 5) with queries 1 and 4 confident (thing class 0, stuff class 2; the top and the
    bottom half of the image), query 0 split between classes 0 and 3, and ImageMasks of a 30 x 37 image padded
    to 32 x 40."""
    generator = torch.Generator().manual_seed(seed)
    mask_cls = torch.randn(queries, 5, generator=generator)
    mask_cls[1, 0] = mask_cls[4, 2] = 8.0
    mask_cls[0, 0] = mask_cls[0, 3] = 6.0  # two likely classes: two of the top instance pairs
    logits = torch.randn(queries, 8, 10, generator=generator) * 4
    logits[1, :4], logits[1, 4:], logits[4, :4], logits[4, 4:] = ON, OFF, OFF, ON  # top and bottom halves
    return mask_cls, ImageMasks(logits, (32, 40), (30, 37))


def resized_every_query(masks: ImageMasks, size) -> torch.Tensor:
    """All the masks at size, by upsampling, cropping and resizing with F.interpolate."""
    up = F.interpolate(masks.logits[None], size=masks.padded_size, mode="bilinear", align_corners=False)
    up = up[..., : masks.image_size[0], : masks.image_size[1]]
    return F.interpolate(up, size=size, mode="bilinear", align_corners=False)[0]


def count_resized_queries(monkeypatch) -> list[int]:
    """Replaces ImageMasks.at by a wrapper that appends the number of queries it resizes."""
    counts = []
    resize = ImageMasks.at

    def counting(self, size, queries=None):
        resized = resize(self, size, queries)
        counts.append(resized.shape[0])
        return resized

    monkeypatch.setattr(ImageMasks, "at", counting)
    return counts


def test_postprocess_resizes_only_the_queries_a_task_reads(monkeypatch):
    """Panoptic resizes the confident queries, instance the queries of its top (query, class) pairs (each
    once), semantic all; the results equal those of the inference functions given every query resized."""
    import dataclasses

    from m2f.config import get_config
    from m2f.engine.evaluate import postprocess

    config = get_config("demo-tiny")
    config = dataclasses.replace(config, inference=dataclasses.replace(config.inference, top_k=4))
    mask_cls, masks = predicted_masks(0)
    output_size = (45, 50)
    every = resized_every_query(masks, output_size)
    counts = count_resized_queries(monkeypatch)

    panoptic = postprocess(["panoptic"], mask_cls, masks, output_size, config, {0})["panoptic"]
    expected_seg, expected_segments = panoptic_inference(mask_cls, every, {0})
    assert torch.equal(panoptic[0], expected_seg) and panoptic[1] == expected_segments
    assert [s["category_id"] for s in expected_segments] == [0, 2]
    assert counts == [2]

    instances = postprocess(["instance"], mask_cls, masks, output_size, config, {0, 1, 2, 3})["instance"]
    expected = instance_inference(mask_cls, every, 4, top_k=4, thing_classes={0, 1, 2, 3})
    for key, value in expected.items():
        assert torch.equal(instances[key], value), key
    assert sorted(instances["labels"].tolist()) == [0, 0, 2, 3]
    assert counts[1:] == [3]  # queries 0, 1 and 4

    semantic = postprocess(["semantic"], mask_cls, masks, output_size, config, set())["semantic"]
    assert torch.equal(semantic, semantic_inference(mask_cls, every).argmax(0))
    assert counts[2:] == [6]


def test_postprocess_with_no_confident_query_resizes_nothing(monkeypatch):
    from m2f.config import get_config
    from m2f.engine.evaluate import postprocess

    mask_cls, masks = predicted_masks(1)
    mask_cls[:, -1] = 20.0  # every query says "no object"
    counts = count_resized_queries(monkeypatch)
    panoptic_seg, segments = postprocess(
        ["panoptic"], mask_cls, masks, (45, 50), get_config("demo-tiny"), {0}
    )["panoptic"]
    assert counts == [0] and segments == []
    assert panoptic_seg.shape == (45, 50) and not panoptic_seg.any()


def test_postprocess_of_several_tasks_resizes_the_mask_logits_once(monkeypatch):
    """Each task's output equals that of its own call; with a semantic output, every query is resized once
    and the other tasks take theirs from it."""
    from m2f.config import get_config
    from m2f.engine import evaluate

    mask_cls, masks = predicted_masks(2)
    config, tasks = get_config("demo-tiny"), ["instance", "semantic", "panoptic"]
    single = {task: evaluate.postprocess([task], mask_cls, masks, (13, 17), config, {0, 1}) for task in tasks}
    counts = count_resized_queries(monkeypatch)
    together = evaluate.postprocess(tasks, mask_cls, masks, (13, 17), config, {0, 1})
    assert counts == [6]
    assert list(together) == tasks
    assert torch.equal(together["semantic"], single["semantic"]["semantic"])
    assert torch.equal(together["panoptic"][0], single["panoptic"]["panoptic"][0])
    assert together["panoptic"][1] == single["panoptic"]["panoptic"][1]
    for key, value in single["instance"]["instance"].items():
        assert torch.equal(together["instance"][key], value), key


def test_only_panoptic_models_restrict_instances_to_things():
    """Mask2Former's rule: instances of a panoptic model are thing classes only; a semantic model (ADE20K,
    whose classes are all stuff) still gives its instances."""
    from m2f.config import get_config
    from m2f.engine.evaluate import postprocess

    mask_cls = class_logits([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])
    mask_pred = torch.full((2, 4, 4), OFF)
    mask_pred[0, :2], mask_pred[1, 2:] = ON, ON
    for name, expected in (("semantic-ade20k-r50", 2), ("demo-tiny", 0)):
        instances = postprocess(
            ["instance"], mask_cls, at_image_size(mask_pred), (4, 4), get_config(name), thing_classes=set()
        )["instance"]
        assert (instances["scores"] > 0.5).sum() == expected, name


def test_panoptic_area_is_every_pixel_the_query_wins():
    """Mask2Former's mask_area = (cur_mask_ids == k).sum(): every pixel a query wins by argmax, those where its own
    mask probability is below 0.5 included; only the segment drawn is restricted to probability >= 0.5."""
    # q0 (thing 0, 0.85): ON on pixels 0-4, logit -1 (probability 0.27) on 5-6. q1 (thing 1, 0.95): ON on 3, 4, 7.
    # q0 wins 0-2 and 5-6 (0.85 * 0.27 > 0.95 * sigmoid(-10)): area 5 of its 5 confident pixels -> kept, drawn on
    # 0-2. Counting only its won confident pixels (3 of 5 = 0.6 < 0.8) would drop it.
    mask_cls = class_logits([[0.85, 0.10, 0.05], [0.02, 0.95, 0.03]])
    mask_pred = torch.stack(
        [mask_from_pixels(1, 8, block([0], range(5))), mask_from_pixels(1, 8, [(0, 3), (0, 4), (0, 7)])]
    )
    mask_pred[0, 0, 5:7] = -1.0
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_classes={0, 1})
    assert torch.equal(seg, torch.tensor([[1, 1, 1, 2, 2, 0, 0, 2]], dtype=torch.int32))
    assert [(s["id"], s["category_id"]) for s in info] == [(1, 0), (2, 1)]


def test_panoptic_overlap_ratio_equal_to_threshold_is_kept():
    """Mask2Former drops a segment only when mask_area / original_area < overlap_threshold: 4 / 5 = 0.8 stays."""
    assert 4 / 5 == 0.8
    # q0 (thing 0, 0.85): ON on pixels 0-4, loses pixel 4 to q1 (thing 1, 0.95, ON on 4-5): keeps 4 of 5.
    mask_cls = class_logits([[0.85, 0.10, 0.05], [0.02, 0.95, 0.03]])
    mask_pred = torch.stack(
        [mask_from_pixels(1, 6, block([0], range(5))), mask_from_pixels(1, 6, [(0, 4), (0, 5)])]
    )
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_classes={0, 1}, overlap_threshold=0.8)
    assert torch.equal(seg, torch.tensor([[1, 1, 1, 1, 2, 2]], dtype=torch.int32))
    assert [(s["id"], s["category_id"]) for s in info] == [(1, 0), (2, 1)]


def test_panoptic_score_equal_to_object_threshold_is_dropped():
    """Mask2Former keeps queries with scores > object_mask_threshold (strict): a score exactly at the threshold
    is dropped, one just above it kept."""
    # Softmax of [0, -inf, -inf] is exactly [1, 0, 0]: score 1.0, class 0.
    mask_cls = torch.tensor([[0.0, -math.inf, -math.inf]])
    mask_pred = torch.full((1, 2, 2), ON)
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_classes={0}, object_mask_threshold=1.0)
    assert torch.equal(seg, torch.zeros(2, 2, dtype=torch.int32)) and info == []
    # A score that is not a round number: the threshold set to the score itself (float32, as computed).
    mask_cls = class_logits([[0.83, 0.1, 0.07]])
    score = mask_cls.softmax(-1).max().item()
    assert score == pytest.approx(0.83, abs=1e-6)
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_classes={0}, object_mask_threshold=score)
    assert info == []
    below = torch.nextafter(torch.tensor(score), torch.tensor(0.0)).item()  # the float32 just below
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_classes={0}, object_mask_threshold=below)
    assert torch.equal(seg, torch.ones(2, 2, dtype=torch.int32)) and len(info) == 1


def test_mask_logit_zero_is_in_panoptic_area_but_not_in_instance_mask():
    """A mask logit of exactly 0 (probability 0.5): Mask2Former's panoptic inference counts it in the query's own
    area and segment (cur_masks[k] >= 0.5), its instance inference leaves it out of the mask (mask_pred > 0)."""
    assert torch.tensor(0.0).sigmoid().item() == 0.5
    mask_cls = class_logits([[0.85, 0.10, 0.05], [0.02, 0.95, 0.03]])
    # q0 alone: ON on pixels 0-3, logit 0 on pixel 4 -> its segment is pixels 0-4.
    alone = mask_from_pixels(1, 6, block([0], range(4)))
    alone[0, 4] = 0.0
    seg, info = panoptic_inference(mask_cls[:1], alone[None], thing_classes={0, 1})
    assert torch.equal(seg, torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.int32))
    # q1 (0.95, ON on 4-5) takes pixel 4: q0 keeps 4 of its 5 pixels (0.8 < 0.9) -> dropped; with the logit-0
    # pixel left out of its area it would keep 4 of 4.
    mask_pred = torch.stack([alone, mask_from_pixels(1, 6, [(0, 4), (0, 5)])])
    seg, info = panoptic_inference(mask_cls, mask_pred, thing_classes={0, 1}, overlap_threshold=0.9)
    assert torch.equal(seg, torch.tensor([[0, 0, 0, 0, 1, 1]], dtype=torch.int32))
    assert [(s["id"], s["category_id"]) for s in info] == [(1, 1)]
    # Instance: one pixel of logit 2, one of logit 0, the rest -3: the mask, its box and its mean probability
    # are those of the logit-2 pixel alone.
    instance_pred = torch.full((1, 3, 4), -3.0)
    instance_pred[0, 0, 0] = 2.0
    instance_pred[0, 2, 3] = 0.0
    result = instance_inference(class_logits([[0.6, 0.4]]), instance_pred, num_classes=1, top_k=1)
    expected_mask = torch.zeros(3, 4, dtype=torch.bool)
    expected_mask[0, 0] = True
    assert torch.equal(result["masks"][0], expected_mask)
    assert result["boxes"].tolist() == [[0, 0, 1, 1]]
    assert result["scores"].tolist() == pytest.approx([0.6 * sigmoid(2.0)], rel=1e-5)
