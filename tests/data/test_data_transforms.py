import colorsys
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from m2f.data import LSJ, CocoInstanceDataset, CocoPanopticDataset, Geometry, ResizeShortestEdge
from m2f.data.synthetic import SYNTHETIC_CATEGORIES
from m2f.data.transforms import (
    ColorJitter,
    PhotometricDistortion,
    SemanticAugmentation,
    category_limited_crop,
)


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
    valid_h, valid_w = geometry.valid_size
    painted = np.zeros_like(out_mask)  # the padding (gray 128) is not painted
    painted[:valid_h, :valid_w] = out_image[:valid_h, :valid_w, 0] > 127
    if out_mask.sum() > 50:
        assert _iou(painted, out_mask) > 0.9
    # away from the mask boundary the two agree exactly
    boundary = np.zeros_like(out_mask)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            boundary |= np.roll(out_mask, (dy, dx), axis=(0, 1)) != out_mask
    assert np.array_equal(painted[~boundary], out_mask[~boundary])


def test_lsj_pads_the_image_with_128_and_the_masks_with_nothing():
    """A crop larger than the scaled image is padded with 128 (near the pixel mean, as Mask2Former's LSJ
    pads); the segmentation padding is the caller's fill."""
    image = np.full((40, 40, 3), 7, np.uint8)
    geometry = LSJ(64, min_scale=0.5, max_scale=0.5, flip=False).get_geometry(
        40, 40, np.random.default_rng(0)
    )
    assert geometry.resized_size == (32, 32)
    out = geometry.apply_image(image)
    assert (out[:32, :32] == 7).all() and (out[32:] == 128).all() and (out[:, 32:] == 128).all()
    assert (geometry.apply_segmentation(np.ones((40, 40), np.int32), fill=0)[32:] == 0).all()


def test_crop_and_flip_without_resize_are_exact():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    seg = rng.integers(0, 5, size=(20, 30)).astype(np.int32)
    geometry = Geometry((20, 30), (20, 30), top=3, left=4, out_size=(24, 24), flip=True)
    out_image = geometry.apply_image(image, pad_value=7)
    out_seg = geometry.apply_segmentation(seg, fill=-1)
    assert geometry.valid_size == (17, 24)
    # the window's content is mirrored; the padding stays at the bottom
    expected = np.full((24, 24, 3), 7, np.uint8)
    expected[:17, :24] = image[3:20, 4:28][:, ::-1]
    assert np.array_equal(out_image, expected)
    expected_seg = np.full((24, 24), -1)
    expected_seg[:17, :24] = seg[3:20, 4:28][:, ::-1]
    assert np.array_equal(out_seg, expected_seg)


def test_flip_keeps_the_padding_at_the_right():
    image = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    geometry = Geometry((2, 5), (2, 5), top=0, left=1, out_size=(3, 6), flip=True)
    out = geometry.apply_image(image, pad_value=9)
    assert geometry.valid_size == (2, 4)
    assert np.array_equal(out[:2, :4], image[:, [4, 3, 2, 1]])
    assert (out[2:] == 9).all() and (out[:, 4:] == 9).all()
    # a polygon point at the window's left edge lands on the valid part's right edge
    assert geometry.apply_polygons([[1.0, 0.0, 5.0, 2.0]]) == [[4.0, 0.0, 0.0, 2.0]]


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


@pytest.mark.parametrize("scales", [(0.0, 1.0), (2.0, 1.0), (0.1, math.inf), (math.nan, 1.0)])
def test_lsj_scales_must_be_finite_and_ordered(scales):
    with pytest.raises(ValueError, match="need 0 < min_scale <= max_scale"):
        LSJ(100, *scales)


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
    with pytest.raises(ValueError, match="image_size must be a positive int, got 0"):
        LSJ(0)
    with pytest.raises(ValueError, match="image_size must be a positive int, got True"):
        LSJ(True)
    assert LSJ(np.int64(64)).image_size == 64
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


# --- semantic segmentation training recipe ------------------------------------------------------------------


def _crop_is_acceptable(window, max_area, ignore=255):
    """The single-category rule written out with a dict of counts: two classes or more and the largest
    covering less than max_area of the non-ignore pixels."""
    counts = {}
    for value in window.ravel().tolist():
        if value != ignore:
            counts[value] = counts.get(value, 0) + 1
    return len(counts) > 1 and max(counts.values()) < max_area * sum(counts.values())


def _drawn_windows(seed, size, crop, tries=10):
    """The (top, left) pairs a Generator seeded with `seed` gives for uniformly placed windows."""
    rng = np.random.default_rng(seed)
    return [
        (int(rng.integers(size[0] - crop[0] + 1)), int(rng.integers(size[1] - crop[1] + 1)))
        for _ in range(tries)
    ]


def _mostly_one_class_map():
    """(120, 120): class 0 everywhere but a 24 x 24 block of class 1 and an ignore stripe; only windows of
    32 that take a large part of the block pass a 0.8 limit."""
    sem_seg = np.zeros((120, 120), np.int32)
    sem_seg[80:104, 10:34] = 1
    sem_seg[:, 60:66] = 255
    return sem_seg


def test_category_limited_crop_refuses_a_nan_area():
    with pytest.raises(ValueError, match="single_category_max_area must be > 0, got nan"):
        category_limited_crop(np.zeros((8, 8), np.uint8), (4, 4), np.random.default_rng(0), math.nan)


def test_category_limited_crop_takes_the_first_acceptable_window_or_the_tenth():
    sem_seg, crop, max_area = _mostly_one_class_map(), (32, 32), 0.8
    passed_first, fell_back = 0, 0
    for seed in range(150):
        windows = _drawn_windows(seed, sem_seg.shape, crop)
        acceptable = [_crop_is_acceptable(sem_seg[t : t + 32, x : x + 32], max_area) for t, x in windows]
        expected = windows[acceptable.index(True)] if any(acceptable) else windows[-1]
        chosen = category_limited_crop(sem_seg, crop, np.random.default_rng(seed), max_area)
        assert chosen == expected
        passed_first += acceptable[0]
        fell_back += not any(acceptable)
    # most single draws fail the rule, so both the redraw and the ten-tries fallback were exercised
    assert passed_first < 40 and 0 < fell_back < 150


def test_category_limited_crop_rejects_dominated_windows_much_more_often():
    sem_seg, crop = _mostly_one_class_map(), (32, 32)

    def acceptable_share(max_area):
        chosen = [
            category_limited_crop(sem_seg, crop, np.random.default_rng(s), max_area) for s in range(200)
        ]
        return np.mean([_crop_is_acceptable(sem_seg[t : t + 32, x : x + 32], 0.8) for t, x in chosen])

    assert acceptable_share(0.8) > 0.6 and acceptable_share(1.0) < 0.2


def test_category_limited_crop_leaves_ignore_pixels_out_of_the_count():
    # every window is 50% class 0, 20% class 1 and 30% ignore (or has no class 1): with ignore counted the
    # largest class would be at 50%; without it, at 5/7 = 71%
    sem_seg = np.zeros((10, 40), np.int32)
    sem_seg[:, ::10] = 1
    sem_seg[:, 1::10] = 1
    sem_seg[:, 2::10] = 255
    sem_seg[:, 3::10] = 255
    sem_seg[:, 4::10] = 255
    for seed in range(20):
        windows = _drawn_windows(seed, sem_seg.shape, (10, 10))
        assert category_limited_crop(sem_seg, (10, 10), np.random.default_rng(seed), 0.6) == windows[-1]
        first = windows[0]
        assert category_limited_crop(sem_seg, (10, 10), np.random.default_rng(seed), 0.75) == first


def test_category_limited_crop_limit_is_strict():
    sem_seg = np.zeros((10, 30), np.int32)
    sem_seg[:, 1::2] = 1  # every 10 x 10 window is exactly half class 0, half class 1
    for seed in range(10):
        windows = _drawn_windows(seed, sem_seg.shape, (10, 10))
        assert category_limited_crop(sem_seg, (10, 10), np.random.default_rng(seed), 0.5) == windows[-1]
        assert category_limited_crop(sem_seg, (10, 10), np.random.default_rng(seed), 0.51) == windows[0]


def test_category_limited_crop_needs_two_classes_and_draws_ten_times():
    sem_seg = np.full((50, 60), 3, np.int32)
    sem_seg[:10] = 255
    for seed in range(5):
        rng = np.random.default_rng(seed)
        assert (
            category_limited_crop(sem_seg, (20, 20), rng, 0.99)
            == _drawn_windows(seed, (50, 60), (20, 20))[-1]
        )
        reference = np.random.default_rng(seed)
        reference.integers(10, size=20)  # twenty integer draws, one per coordinate
        assert rng.uniform() == reference.uniform()
        # at 1.0 (the recipe's value) the first window is kept without looking at the labels
        rng = np.random.default_rng(seed)
        assert (
            category_limited_crop(sem_seg, (20, 20), rng, 1.0) == _drawn_windows(seed, (50, 60), (20, 20))[0]
        )


def test_category_limited_crop_clamps_the_window_to_small_maps():
    sem_seg = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert category_limited_crop(sem_seg, (8, 8), np.random.default_rng(0), 0.5) == (0, 0)
    with pytest.raises(ValueError, match="sem_seg"):
        category_limited_crop(np.zeros((2, 3, 1), np.int32), (2, 2), np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_tries"):
        category_limited_crop(sem_seg, (2, 2), np.random.default_rng(0), 0.5, max_tries=0)


@pytest.mark.parametrize(("crop", "max_size"), [(512, 2048), (640, 2560)])
def test_semantic_augmentation_short_sizes_follow_the_recipe(crop, max_size):
    augmentation = SemanticAugmentation(crop)
    assert augmentation.short_sizes == [int(x * 0.1 * crop) for x in range(5, 21)]
    assert augmentation.max_size == max_size
    chosen = set()
    for seed in range(100):
        geometry = augmentation.get_geometry(480, 640, np.random.default_rng(seed))
        short = min(geometry.resized_size)
        assert short in augmentation.short_sizes
        assert abs(max(geometry.resized_size) - short * 640 / 480) <= 1
        chosen.add(short)
    assert len(chosen) > 10
    # a very long image is limited by max_size
    geometry = augmentation.get_geometry(100, 1000, np.random.default_rng(0))
    assert max(geometry.resized_size) == max_size


LABEL_OFFSET = 1000


def _coordinate_image(height, width):
    """Image whose red channel is the row and green the column (both < 256); labels = LABEL_OFFSET + row *
    width + col (none equal to the ignore value)."""
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    return image, (LABEL_OFFSET + rows * width + cols).astype(np.int32)


def test_semantic_augmentation_keeps_image_and_labels_aligned_exactly_without_resize():
    image, labels = _coordinate_image(20, 50)
    augmentation = SemanticAugmentation(20, min_scale=1.0, max_scale=1.0, color=False)
    flips = set()
    for seed in range(20):
        out_image, out_labels = augmentation.apply(image, labels, np.random.default_rng(seed))
        assert out_image.shape == (20, 20, 3) and out_labels.shape == (20, 20)
        rows, cols = np.divmod(out_labels - LABEL_OFFSET, 50)
        assert np.array_equal(out_image[..., 0], rows) and np.array_equal(out_image[..., 1], cols)
        assert np.array_equal(rows, np.arange(20)[:, None].repeat(20, 1))
        steps = np.unique(np.diff(cols, axis=1))
        assert len(steps) == 1 and steps[0] in (-1, 1)  # one contiguous window, mirrored or not
        flips.add(int(steps[0]))
    assert flips == {-1, 1}


def test_semantic_augmentation_keeps_image_and_labels_aligned_under_resize():
    image, labels = _coordinate_image(60, 90)
    augmentation = SemanticAugmentation(48, min_scale=0.5, max_scale=2.0, color=False)
    for seed in range(20):
        out_image, out_labels = augmentation.apply(image, labels, np.random.default_rng(seed))
        valid = out_labels != 255
        rows, cols = np.divmod(out_labels[valid] - LABEL_OFFSET, 90)
        # the bilinear image and the nearest labels point at the same source pixel within a pixel
        assert np.abs(out_image[..., 0][valid].astype(int) - rows).max() <= 1
        assert np.abs(out_image[..., 1][valid].astype(int) - cols).max() <= 1


@pytest.mark.parametrize("color", [False, True])
def test_semantic_augmentation_pads_small_images_bottom_right(color):
    image, labels = _coordinate_image(30, 45)
    # short side 0.5 x 64 = 32: the resized image is 32 x 48, inside the 64 x 64 crop
    augmentation = SemanticAugmentation(64, min_scale=0.5, max_scale=0.5, color=color)
    for seed in range(10):
        out_image, out_labels = augmentation.apply(image, labels, np.random.default_rng(seed))
        assert out_image.shape == (64, 64, 3) and out_labels.shape == (64, 64)
        assert (out_labels[32:] == 255).all() and (out_labels[:, 48:] == 255).all()
        assert (out_image[32:] == 128).all() and (out_image[:, 48:] == 128).all()
        assert (out_labels[:32, :48] != 255).all()
        assert set(np.unique((out_labels[:32, :48] - LABEL_OFFSET) // 45)) == set(range(30))


def test_semantic_augmentation_is_deterministic_for_a_seed():
    rng = np.random.default_rng(123)
    image = rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, size=(70, 90)).astype(np.int32)
    augmentation = SemanticAugmentation(40, single_category_max_area=0.75)
    outputs = [augmentation.apply(image, labels, np.random.default_rng(s)) for s in (5, 5, 6, 7)]
    assert np.array_equal(outputs[0][0], outputs[1][0]) and np.array_equal(outputs[0][1], outputs[1][1])
    assert not all(np.array_equal(outputs[0][0], other[0]) for other in outputs[2:])


def test_semantic_augmentation_uses_the_category_limit():
    labels = np.zeros((60, 60), np.int32)
    labels[35:55, 5:25] = 1
    image = np.zeros((60, 60, 3), np.uint8)

    def acceptable_share(max_area):
        # short side 2.0 x 30 = 60: no resize, 30 x 30 windows
        augmentation = SemanticAugmentation(
            30, min_scale=2.0, max_scale=2.0, single_category_max_area=max_area, color=False
        )
        crops = [augmentation.apply(image, labels, np.random.default_rng(s))[1] for s in range(100)]
        return np.mean([_crop_is_acceptable(crop, 0.75) for crop in crops])

    assert acceptable_share(0.75) > 2 * acceptable_share(1.0) + 0.2


def test_semantic_augmentation_ignore_value_and_arguments():
    image, labels = _coordinate_image(10, 10)
    # short side 0.5 x 16 = 8: an 8 x 8 image padded to 16 x 16 with the chosen ignore value
    augmentation = SemanticAugmentation(16, min_scale=0.5, max_scale=0.5, ignore_label=-1, color=False)
    _, out_labels = augmentation.apply(image, labels, np.random.default_rng(0))
    assert (out_labels[8:] == -1).all() and (out_labels[:, 8:] == -1).all()
    assert (out_labels[:8, :8] >= LABEL_OFFSET).all()
    with pytest.raises(ValueError, match="sem_seg"):
        SemanticAugmentation(16, single_category_max_area=0.5).get_geometry(10, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="sem_seg"):
        augmentation.apply(image, labels[:5], np.random.default_rng(0))
    with pytest.raises(ValueError, match="crop_size"):
        SemanticAugmentation(0)
    with pytest.raises(ValueError, match="min_scale"):
        SemanticAugmentation(64, min_scale=2.0, max_scale=1.0)
    with pytest.raises(ValueError, match=r"multiple of 0\.1"):
        SemanticAugmentation(64, min_scale=0.51, max_scale=0.55)
    with pytest.raises(ValueError, match="single_category_max_area"):
        SemanticAugmentation(64, single_category_max_area=0.0)


# --- photometric distortion ------------------------------------------------------------------------------


def _hsv_reference(image, saturation=1.0, hue_degrees=0.0):
    """Per pixel through colorsys: saturation x factor (at most 1), hue turned by degrees."""
    out = np.empty(image.shape, np.float64)
    for index in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(image[index] / 255.0))
        rgb = colorsys.hsv_to_rgb((h + hue_degrees / 360) % 1.0, min(s * saturation, 1.0), v)
        out[index] = np.asarray(rgb) * 255
    return np.round(out)


@pytest.mark.parametrize(("saturation", "hue"), [(1.4, None), (0.6, None), (None, 25.0), (None, -36.0)])
def test_color_jitter_saturation_and_hue_match_colorsys(saturation, hue):
    image = np.random.default_rng(0).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    image[0, 0] = (90, 90, 90)  # grey: no hue
    out = ColorJitter(saturation=saturation, hue=hue).apply(image)
    expected = _hsv_reference(image, saturation or 1.0, hue or 0.0)
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert np.array_equal(out[0, 0], [90, 90, 90])


def test_color_jitter_brightness_contrast_and_order():
    image = np.array([[[10, 100, 200], [250, 0, 60]]], np.uint8)
    assert np.array_equal(ColorJitter(brightness=20.0).apply(image), [[[30, 120, 220], [255, 20, 80]]])
    assert np.array_equal(ColorJitter(contrast=1.5).apply(image), [[[15, 150, 255], [255, 0, 90]]])
    # contrast before or after the saturation change gives different results once values clip
    first = ColorJitter(contrast=1.5, saturation=0.5).apply(image)
    last = ColorJitter(contrast=1.5, saturation=0.5, contrast_last=True).apply(image)
    expected_first = _hsv_reference(np.clip(image.astype(float) * 1.5, 0, 255), saturation=0.5)
    expected_last = np.clip(_hsv_reference(image, saturation=0.5) * 1.5, 0, 255)
    assert np.abs(first.astype(int) - expected_first).max() <= 1
    assert np.abs(last.astype(int) - np.round(expected_last)).max() <= 1
    assert not np.array_equal(first, last)
    assert np.array_equal(ColorJitter().apply(image), image)


def test_photometric_distortion_draws_in_range_and_reproducibly():
    distortion = PhotometricDistortion()
    draws = [distortion.sample(np.random.default_rng(seed)) for seed in range(400)]
    assert draws[:5] == [distortion.sample(np.random.default_rng(seed)) for seed in range(5)]
    for name, low, high in (("brightness", -32, 32), ("contrast", 0.5, 1.5), ("saturation", 0.5, 1.5)):
        values = [getattr(d, name) for d in draws if getattr(d, name) is not None]
        assert 0.4 < len(values) / len(draws) < 0.6
        assert low <= min(values) and max(values) <= high and max(values) - min(values) > 0.8 * (high - low)
    hues = [d.hue for d in draws if d.hue is not None]
    assert 0.4 < len(hues) / len(draws) < 0.6 and -36 <= min(hues) and max(hues) <= 36
    assert 0.4 < np.mean([d.contrast_last for d in draws]) < 0.6
    with pytest.raises(ValueError, match="hue_delta"):
        PhotometricDistortion(hue_delta=200)
    with pytest.raises(ValueError, match="contrast_range"):
        PhotometricDistortion(contrast_range=(1.5, 0.5))


def test_lsj_crop_offsets_range_over_each_side_independently():
    """A wide image cropped only horizontally, a tall one only vertically: the left (top) offset is drawn over
    every position the resized width (height) allows, the other offset stays 0."""
    lsj = LSJ(100, min_scale=2.0, max_scale=2.0, flip=False)  # the long side becomes 200
    lefts, tops = [], []
    for seed in range(60):
        wide = lsj.get_geometry(50, 200, np.random.default_rng(seed))
        assert wide.resized_size == (50, 200) and wide.top == 0
        lefts.append(wide.left)
        tall = lsj.get_geometry(200, 50, np.random.default_rng(seed))
        assert tall.resized_size == (200, 50) and tall.left == 0
        tops.append(tall.top)
    for offsets in (lefts, tops):
        assert 0 <= min(offsets) and max(offsets) <= 100
        assert max(offsets) - min(offsets) > 70 and len(set(offsets)) > 20


def test_semantic_augmentation_takes_crops_of_any_shape():
    """Cityscapes' recipe: 512 x 1024 crops from the short side resized to 0.5-2 x 1024 (the crop's long side),
    the long side at most 4096; every output has the crop's shape, padding where the image is smaller."""
    augmentation = SemanticAugmentation((512, 1024))
    assert augmentation.crop_size == (512, 1024)
    assert augmentation.short_sizes == [int(x * 0.1 * 1024) for x in range(5, 21)]
    assert augmentation.max_size == 4096
    image, labels = _coordinate_image(200, 240)
    small = SemanticAugmentation((24, 48), min_scale=0.1, max_scale=0.1)  # short side 4: all padding beyond
    for seed in range(5):
        out_image, out_labels = SemanticAugmentation((24, 48)).apply(
            image, labels, np.random.default_rng(seed)
        )
        assert out_image.shape == (24, 48, 3) and out_labels.shape == (24, 48)
        assert (out_labels != 255).all()  # the resized image (short side >= 24) covers every crop
        _, padded = small.apply(image, labels, np.random.default_rng(seed))
        assert padded.shape == (24, 48) and (padded[4:] == 255).all() and (padded[:, 5:] == 255).all()
    for bad in ((0, 5), (5,), (5.0, 5), (True, 5), "64"):
        with pytest.raises(ValueError, match=r"crop_size must be an int >= 1 or \(height, width\)"):
            SemanticAugmentation(bad)
