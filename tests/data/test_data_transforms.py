import numpy as np
import pytest
from pycocotools import mask as mask_utils

from m2f.data import LSJ, CocoInstanceDataset, CocoPanopticDataset, Geometry, ResizeShortestEdge
from m2f.data.synthetic import SYNTHETIC_CATEGORIES


def _disk(size, cx, cy, radius):
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("seed", range(12))
def test_lsj_keeps_a_painted_mask_aligned_with_the_image(seed):
    size = 96
    mask = _disk(size, 40, 50, 22) | _disk(size, 75, 20, 10)
    image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    geometry = LSJ(64, min_scale=0.5, max_scale=2.0).get_geometry(size, size, np.random.default_rng(seed))
    out_image = geometry.apply_image(image)
    out_mask = geometry.apply_segmentation(mask.astype(np.int32), fill=0) > 0
    assert out_image.shape == (64, 64, 3) and out_mask.shape == (64, 64)
    painted = out_image[..., 0] > 127
    if out_mask.sum() > 50:
        assert _iou(painted, out_mask) > 0.9
    # away from the mask boundary the two agree exactly
    boundary = np.zeros_like(out_mask)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            boundary |= np.roll(out_mask, (dy, dx), axis=(0, 1)) != out_mask
    assert np.array_equal(painted[~boundary], out_mask[~boundary])


def test_crop_and_flip_without_resize_are_exact():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    seg = rng.integers(0, 5, size=(20, 30)).astype(np.int32)
    geometry = Geometry((20, 30), (20, 30), top=3, left=4, out_size=(24, 24), flip=True)
    out_image = geometry.apply_image(image, pad_value=7)
    out_seg = geometry.apply_segmentation(seg, fill=-1)
    expected = np.full((24, 24, 3), 7, np.uint8)
    expected[:17, :24] = image[3:20, 4:28]
    assert np.array_equal(out_image, expected[:, ::-1])
    expected_seg = np.full((24, 24), -1)
    expected_seg[:17, :24] = seg[3:20, 4:28]
    assert np.array_equal(out_seg, expected_seg[:, ::-1])


@pytest.mark.parametrize("flip", [False, True])
def test_transformed_polygon_matches_the_transformed_mask(flip):
    polygon = [10.0, 10.0, 50.0, 14.0, 44.0, 52.0, 12.0, 40.0]
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], 60, 80)))
    geometry = Geometry((60, 80), (100, 200), top=20, left=30, out_size=(90, 90), flip=flip)
    from_mask = geometry.apply_segmentation(mask, fill=0) > 0
    moved = geometry.apply_polygons([polygon])
    from_polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(moved, 90, 90))) > 0
    assert from_mask.sum() > 1000
    assert _iou(from_mask, from_polygon) > 0.97
    centroid = [np.argwhere(m).mean(0) for m in (from_mask, from_polygon)]
    assert np.abs(centroid[0] - centroid[1]).max() < 0.3


def test_polygon_coordinates_by_hand():
    geometry = Geometry((60, 80), (100, 200), top=20, left=30, out_size=(90, 90), flip=True)
    # x: 10 * 200/80 - 30 = -5, mirrored: 90 - (-5) = 95; y: 12 * 100/60 - 20 = 0
    assert geometry.apply_polygons([[10.0, 12.0, 40.0, 30.0]]) == [[95.0, 0.0, 20.0, 30.0]]


def test_lsj_geometry_ranges_and_determinism():
    lsj = LSJ(100, min_scale=0.1, max_scale=2.0)
    flips, scales = [], []
    for seed in range(200):
        geometry = lsj.get_geometry(50, 80, np.random.default_rng(seed))
        assert geometry == lsj.get_geometry(50, 80, np.random.default_rng(seed))
        assert geometry.output_size == (100, 100)
        resized_h, resized_w = geometry.resized_size
        scale = max(resized_h, resized_w) / 100  # the long side fits the jittered target size
        assert 0.1 - 0.02 <= scale <= 2.0 + 0.02
        assert abs(resized_h / resized_w - 50 / 80) < 0.05
        assert 0 <= geometry.top <= max(0, resized_h - 100) and 0 <= geometry.left <= max(0, resized_w - 100)
        flips.append(geometry.flip)
        scales.append(scale)
    assert 0.35 < np.mean(flips) < 0.65
    assert min(scales) < 0.3 and max(scales) > 1.8
    no_flip = LSJ(100, flip=False)
    assert not any(no_flip.get_geometry(50, 80, np.random.default_rng(s)).flip for s in range(50))


@pytest.mark.parametrize(
    ("size", "expected"), [((480, 640), (800, 1067)), ((100, 1000), (133, 1333)), ((800, 800), (800, 800))]
)
def test_resize_shortest_edge_sizes(size, expected):
    geometry = ResizeShortestEdge(800, 1333).get_geometry(*size)
    assert geometry.output_size == expected
    image = np.zeros((*size, 3), np.uint8)
    assert geometry.apply_image(image).shape == (*expected, 3)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="image_size"):
        LSJ(0)
    with pytest.raises(ValueError, match="min_scale"):
        LSJ(64, min_scale=2.0, max_scale=1.0)
    with pytest.raises(ValueError, match="short"):
        ResizeShortestEdge([])
    with pytest.raises(ValueError, match="image"):
        Geometry((10, 10), (20, 20)).apply_image(np.zeros((11, 10, 3), np.uint8))


THING_COLORS = {i: np.array(c["color"]) for i, c in enumerate(SYNTHETIC_CATEGORIES) if c["isthing"]}


def _eroded(mask, steps=2):
    for _ in range(steps):
        mask = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    return mask


@pytest.mark.parametrize("dataset_class", [CocoPanopticDataset, CocoInstanceDataset])
def test_dataset_masks_stay_on_their_colour_under_lsj(synthetic_root, dataset_class):
    dataset = dataset_class(synthetic_root, "train", LSJ(96, min_scale=0.8, max_scale=1.6), seed=3)
    checked = 0
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            image = item["image"].permute(1, 2, 0).numpy().astype(np.int64)
            for label, mask in zip(item["labels"].tolist(), item["masks"].numpy()):
                inside = _eroded(mask)
                if label not in THING_COLORS or inside.sum() < 20:
                    continue
                colour = np.median(image[inside], axis=0)
                assert np.abs(colour - THING_COLORS[label]).max() < 40
                checked += 1
    assert checked > 10
