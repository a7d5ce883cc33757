import numpy as np
import pytest

from m2f import visualize


def test_panoptic_overlay_blends_class_colours():
    image = np.full((300, 300, 3), 100, dtype=np.uint8)
    seg = np.zeros((300, 300), dtype=np.int32)
    seg[:150] = 1
    seg[150:, 150:] = 2
    segments = [{"id": 1, "category_id": 0, "isthing": False}, {"id": 2, "category_id": 2, "isthing": True}]
    overlay = np.asarray(visualize.draw_panoptic(image, seg, segments, ["sky", "grass", "car"]))
    palette = visualize.class_colors(3)
    expected_sky = np.round(
        100 * (1 - visualize.MASK_ALPHA) + visualize.MASK_ALPHA * palette[0].astype(float)
    )
    np.testing.assert_array_equal(overlay[50, 50], expected_sky)
    np.testing.assert_array_equal(overlay[200, 50], [100, 100, 100])  # void is left as it is
    assert overlay.shape[1] > 300  # legend panel


def test_small_images_are_enlarged_by_an_integer_factor():
    image = np.zeros((64, 32, 3), dtype=np.uint8)
    label_map = np.zeros((64, 32), dtype=np.int64)
    label_map[:, 16:] = 1
    overlay = np.asarray(visualize.draw_semantic(image, label_map, ["a", "b"]))
    assert overlay.shape[0] == 256
    palette = visualize.class_colors(2)
    np.testing.assert_array_equal(overlay[10, 20], np.round(visualize.MASK_ALPHA * palette[0].astype(float)))
    np.testing.assert_array_equal(overlay[10, 100], np.round(visualize.MASK_ALPHA * palette[1].astype(float)))


def test_instances_respect_score_threshold():
    image = np.full((256, 256, 3), 50, dtype=np.uint8)
    masks = np.zeros((2, 256, 256), dtype=bool)
    masks[0, 10:50, 10:50] = True
    masks[1, 100:150, 100:150] = True
    overlay = np.asarray(visualize.draw_instances(image, masks, [0, 1], [0.9, 0.2], ["a", "b"], 0.5))
    assert not np.array_equal(overlay[30, 30], [50, 50, 50])
    np.testing.assert_array_equal(overlay[125, 125], [50, 50, 50])


def test_semantic_overlay_without_an_ignore_value_colours_class_255():
    """A model with 256 or more classes predicts class 255 like any other: predict draws with no ignore
    value."""
    image = np.full((256, 256, 3), 100, dtype=np.uint8)
    label_map = np.zeros((256, 256), dtype=np.int64)
    label_map[:, 128:] = 255
    names = [f"c{i}" for i in range(300)]
    palette = visualize.class_colors(300)
    overlay = np.asarray(visualize.draw_semantic(image, label_map, names, ignore_index=None))
    expected = np.round(100 * (1 - visualize.MASK_ALPHA) + visualize.MASK_ALPHA * palette[255].astype(float))
    np.testing.assert_array_equal(overlay[10, 200], expected)
    default = np.asarray(visualize.draw_semantic(image, label_map, names))
    np.testing.assert_array_equal(default[10, 200], [100, 100, 100])  # 255 is the ignore value by default


def test_names_with_newlines_are_drawn_on_one_line():
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    masks = np.zeros((1, 256, 256), dtype=bool)
    masks[0, 10:50, 10:50] = True
    names = ["traffic\nlight"]
    instances = visualize.draw_instances(image, masks, [0], [0.9], names, 0.5)
    one_line = visualize.draw_instances(image, masks, [0], [0.9], ["traffic light"], 0.5)
    assert np.array_equal(np.asarray(instances), np.asarray(one_line))
    semantic = visualize.draw_semantic(image, masks[0].astype(np.int64) * 0, names)
    assert (
        semantic.size == visualize.draw_semantic(image, masks[0].astype(np.int64) * 0, ["traffic light"]).size
    )


def test_bad_inputs_name_the_argument():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="image"):
        visualize.draw_semantic(np.zeros((8, 8), dtype=np.uint8), np.zeros((8, 8)), ["a"])
    with pytest.raises(ValueError, match="label_map must have the image's size"):
        visualize.draw_semantic(image, np.zeros((4, 8), dtype=np.int64), ["a"])
    with pytest.raises(ValueError, match="outside"):
        visualize.draw_semantic(image, np.full((8, 8), 3), ["a"])
    with pytest.raises(ValueError, match="label_map must hold integer ids, got float64"):
        visualize.draw_semantic(image, np.full((8, 8), 1.5), ["a", "b"])
    with pytest.raises(ValueError, match="panoptic_seg must hold integer ids"):
        visualize.draw_panoptic(image, np.zeros((8, 8), dtype=np.float32), [], ["a"])
    masks = np.ones((2, 8, 8), dtype=bool)
    for labels in ([0, 2], [-1, 0], [0, 1.0], [True, 0]):
        with pytest.raises(ValueError, match=r"labels \[.*\] are not among the 2 classes"):
            visualize.draw_instances(image, masks, labels, [0.9, 0.8], ["a", "b"])
    # Below the score threshold an instance is not drawn, so its label is not looked up.
    visualize.draw_instances(image, masks, [0, 5], [0.9, 0.1], ["a", "b"], 0.5)


def test_neighbouring_instances_of_a_class_get_clearly_different_shades():
    """The first instances of a class (ranks 0 and 1 were 3 levels apart) differ by at least 30 levels in
    some channel, for every class colour of a large palette."""
    for class_color in visualize.class_colors(200):
        shades = [visualize.instance_color(class_color, k).astype(int) for k in range(7)]
        np.testing.assert_array_equal(shades[0], class_color)
        for i in range(7):
            for j in range(i):
                assert np.abs(shades[i] - shades[j]).max() >= 30, (class_color, i, j)


def test_loss_curve_png(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    rows = ["iteration,total_loss,loss_ce,loss_ce_0,lr"] + [
        f"{i},{10 / i},{5 / i},{6 / i},0.1" for i in range(1, 6)
    ]
    csv_path.write_text("\n".join(rows) + "\n")
    visualize.plot_loss_curve(csv_path, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
