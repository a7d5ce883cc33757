"""ONNX export (m2f_kernels.onnx): each op and a tiny Mask2Former, run in onnxruntime, against PyTorch."""

import dataclasses
import math

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
onnxruntime = pytest.importorskip("onnxruntime")

import m2f  # noqa: E402
import m2f_kernels  # noqa: E402
from m2f_kernels import onnx as m2f_onnx  # noqa: E402
from m2f_kernels import reference  # noqa: E402

ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3}


class OpModule(torch.nn.Module):
    """Wraps one op call so that torch.onnx.export sees a module; None inputs are left out of the graph."""

    def __init__(self, function, **kwargs):
        super().__init__()
        self.function = function
        self.kwargs = kwargs

    def forward(self, *inputs):
        return self.function(*inputs, **self.kwargs)


def export_and_run(module, inputs, path, **export_kwargs):
    """Exports ``module`` called on ``inputs``, checks the file holds standard ONNX only, runs onnxruntime."""
    m2f_onnx.export(module.eval(), tuple(inputs), path, **export_kwargs)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert len(model.functions) == 0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [graph_input.name for graph_input in session.get_inputs()]
    return [torch.from_numpy(output) for output in session.run(None, dict(zip(names, feeds(inputs))))]


def feeds(inputs):
    return [tensor.numpy() for tensor in inputs if tensor is not None]


def levels_table(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(dim=1)
    return spatial_shapes, torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def with_special_locations(locations):
    """Puts points on and beyond every border, far outside, and NaN/inf into (..., 2) locations."""
    special = torch.tensor(
        [
            [-0.2, 0.5],
            [1.3, 0.5],
            [0.5, -0.6],
            [0.5, 1.05],
            [0.0, 0.0],
            [1.0, 1.0],
            [-5.0, 7.0],
            [math.nan, 0.5],
            [0.5, math.inf],
        ],
        dtype=locations.dtype,
    )
    flat = locations.reshape(-1, 2).clone()
    flat[: len(special)] = special
    return flat.reshape(locations.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_point_sample(tmp_path, dtype):
    input = torch.randn(2, 3, 5, 7, dtype=dtype)
    coords = with_special_locations(torch.rand(2, 13, 2, dtype=dtype) * 1.4 - 0.2)
    module = OpModule(m2f_kernels.point_sample, backend="torch")
    (out,) = export_and_run(module, (input, coords), tmp_path / "point_sample.onnx")
    expected = reference.point_sample(input, coords)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=ATOL[dtype], rtol=0)


def test_point_sample_of_float64_input_with_float32_coords(tmp_path):
    """The grid stayed float32 beside the float64 image; onnxruntime has no GridSample for mixed dtypes."""
    input = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    coords = with_special_locations(torch.rand(2, 13, 2) * 1.4 - 0.2)
    module = OpModule(m2f_kernels.point_sample, backend="torch")
    (out,) = export_and_run(module, (input, coords), tmp_path / "point_sample_mixed.onnx")
    expected = reference.point_sample(input, coords.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float64], rtol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_levels_of_zero_size(tmp_path, fused):
    """A level with no rows or no columns contributes nothing, as in the reference; the graph failed in
    onnxruntime (a Reshape's 0 copied the input's size, GridSample takes no empty image)."""
    spatial_shapes, level_start_index, total = levels_table([(3, 4), (0, 5), (2, 2), (3, 0)])
    batch, queries, heads, channels, levels, points = 2, 3, 2, 4, 4, 2
    value = torch.randn(batch, total, heads, channels)
    if fused:
        function = m2f_kernels.ms_deform_attn_fused
        rest = (
            torch.rand(batch, queries, levels, 2),
            torch.randn(batch, queries, heads, levels, points, 2),
            torch.randn(batch, queries, heads, levels * points),
        )
    else:
        function = m2f_kernels.ms_deform_attn
        rest = (
            torch.rand(batch, queries, heads, levels, points, 2),
            torch.rand(batch, queries, heads, levels, points),
        )
    inputs = (value, spatial_shapes, level_start_index, *rest)
    (out,) = export_and_run(OpModule(function, backend="torch"), inputs, tmp_path / "zero_size_level.onnx")
    expected = getattr(reference, function.__name__)(*inputs)
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float32], rtol=0)


def test_ms_deform_attn(tmp_path):
    spatial_shapes, level_start_index, total = levels_table([(4, 5), (3, 2), (1, 1)])
    batch, queries, heads, channels, levels, points = 2, 7, 3, 4, 3, 2
    value = torch.randn(batch, total, heads, channels)
    locations = torch.rand(batch, queries, heads, levels, points, 2) * 1.4 - 0.2
    locations = with_special_locations(locations)
    weights = torch.rand(batch, queries, heads, levels, points)
    inputs = (value, spatial_shapes, level_start_index, locations, weights)
    module = OpModule(m2f_kernels.ms_deform_attn, backend="torch")
    (out,) = export_and_run(module, inputs, tmp_path / "ms_deform_attn.onnx")
    expected = reference.ms_deform_attn(*inputs)
    assert out.shape == (batch, queries, heads * channels)
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float32], rtol=0)


def fused_inputs(batch, queries, dtype=torch.float32):
    spatial_shapes, level_start_index, total = levels_table([(6, 4), (3, 2)])
    heads, channels, levels, points = 2, 4, 2, 3
    value = torch.randn(batch, total, heads, channels, dtype=dtype)
    reference_points = torch.rand(batch, queries, levels, 2, dtype=dtype)
    offsets = torch.randn(batch, queries, heads, levels, points, 2, dtype=dtype) * 3
    logits = torch.randn(batch, queries, heads, levels * points, dtype=dtype)
    return value, spatial_shapes, level_start_index, reference_points, offsets, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ms_deform_attn_fused(tmp_path, dtype):
    inputs = fused_inputs(2, 5, dtype)
    module = OpModule(m2f_kernels.ms_deform_attn_fused, backend="torch")
    (out,) = export_and_run(module, inputs, tmp_path / "fused.onnx")
    expected = reference.ms_deform_attn_fused(*(t.double() if t.is_floating_point() else t for t in inputs))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=ATOL[dtype], rtol=0)


def test_ms_deform_attn_fused_dynamic_batch_and_queries(tmp_path):
    batch, queries = torch.export.Dim("batch"), torch.export.Dim("queries")
    per_query = {0: batch, 1: queries}
    module = OpModule(m2f_kernels.ms_deform_attn_fused, backend="torch")
    path = tmp_path / "fused_dynamic.onnx"
    m2f_onnx.export(
        module.eval(),
        fused_inputs(2, 5),
        path,
        dynamic_shapes={"inputs": ({0: batch}, None, None, per_query, per_query, per_query)},
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other_inputs = fused_inputs(3, 8)
    names = [graph_input.name for graph_input in session.get_inputs()]
    (out,) = session.run(None, dict(zip(names, feeds(other_inputs))))
    expected = reference.ms_deform_attn_fused(*other_inputs)
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=ATOL[torch.float32], rtol=0)


def attention_inputs(dtype=torch.float32):
    batch, heads, queries, keys, head_dim = 2, 3, 5, 9, 4
    q = torch.randn(batch, heads, queries, head_dim, dtype=dtype)
    k = torch.randn(batch, heads, keys, head_dim, dtype=dtype)
    v = torch.randn(batch, heads, keys, head_dim, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize(
    ("dtype", "threshold", "scale"),
    [
        (torch.float32, 0.5, None),
        (torch.float32, 0.3, 0.7),
        (torch.float32, 1.0, None),
        (torch.float16, 0.5, None),
    ],
)
def test_masked_attention_mask_logits(tmp_path, dtype, threshold, scale):
    q, k, v = attention_inputs(dtype)
    mask_logits = torch.randn(q.shape[0], q.shape[2], k.shape[2], dtype=dtype)
    mask_logits[0, 1] = -8.0  # a fully blocked row attends to every key
    mask_logits[1, 2, :4] = math.nan  # NaN blocks
    module = OpModule(m2f_kernels.masked_attention, threshold=threshold, scale=scale, backend="torch")
    (out,) = export_and_run(module, (q, k, v, mask_logits), tmp_path / "masked_attention.onnx")
    expected, _ = reference.masked_attention(
        q.float(), k.float(), v.float(), mask_logits=mask_logits.float(), threshold=threshold, scale=scale
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=ATOL[dtype], rtol=0)
    dense, _ = reference.masked_attention(q.float(), k.float(), v.float(), scale=scale)
    torch.testing.assert_close(out[0, :, 1].float(), dense[0, :, 1], atol=ATOL[dtype], rtol=0)


def test_masked_attention_in_float64_keeps_the_scale_exact(tmp_path):
    """The scale was written as a float32 constant, so float64 outputs were only float32-accurate (7.7e-9)."""
    q, k, v = attention_inputs(torch.float64)
    mask_logits = torch.randn(q.shape[0], q.shape[2], k.shape[2], dtype=torch.float64)
    module = OpModule(m2f_kernels.masked_attention, scale=3**-0.5, backend="torch")
    (out,) = export_and_run(module, (q, k, v, mask_logits), tmp_path / "masked_attention_float64.onnx")
    expected, _ = reference.masked_attention(q, k, v, mask_logits=mask_logits, scale=3**-0.5)
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float64], rtol=0)


def test_masked_multihead_attention_with_a_bool_mask_and_key_padding(tmp_path):
    """The padding rule used torch.where on bool tensors, which onnxruntime cannot run (Where(16))."""
    from m2f_kernels.nn import MaskedMultiheadAttention

    torch.manual_seed(0)
    module = MaskedMultiheadAttention(16, 2, batch_first=True).eval()
    query, key = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    attn_mask = torch.rand(5, 7) < 0.5
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = module

        def forward(self, query, key, attn_mask, padding):
            return self.attention(query, key, key, key_padding_mask=padding, attn_mask=attn_mask)[0]

    inputs = (query, key, attn_mask, padding)
    (out,) = export_and_run(Call(), inputs, tmp_path / "mha_padding.onnx")
    with torch.no_grad():
        expected = Call()(*inputs)
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("per_head", [False, True])
def test_masked_attention_bool_mask(tmp_path, per_head):
    q, k, v = attention_inputs()
    batch, heads, queries, _ = q.shape
    attn_mask = torch.rand(batch * heads if per_head else batch, queries, k.shape[2]) < 0.6
    attn_mask[0, 0] = True  # fully blocked row
    module = OpModule(
        lambda q, k, v, attn_mask: m2f_kernels.masked_attention(q, k, v, attn_mask=attn_mask, backend="torch")
    )
    (out,) = export_and_run(module, (q, k, v, attn_mask), tmp_path / "masked_attention_bool.onnx")
    expected, _ = reference.masked_attention(q, k, v, attn_mask=attn_mask)
    torch.testing.assert_close(out, expected, atol=ATOL[torch.float32], rtol=0)


def test_translation_table_covers_the_inference_ops():
    table = m2f_onnx.translation_table()
    ops = torch.ops.m2f_kernels
    for op in (ops.ms_deform_attn, ops.ms_deform_attn_fused, ops.masked_attention, ops.point_sample):
        assert op.default in table


def test_export_rejects_the_torchscript_exporter(tmp_path):
    module = OpModule(m2f_kernels.point_sample, backend="torch")
    with pytest.raises(ValueError, match="dynamo"):
        m2f_onnx.export(
            module, (torch.rand(1, 1, 2, 2), torch.rand(1, 3, 2)), tmp_path / "x.onnx", dynamo=False
        )


def tiny_mask2former():
    """demo-tiny with one encoder and three decoder layers, in eval mode."""
    config = m2f.get_config("demo-tiny")
    config = dataclasses.replace(
        config,
        pixel_decoder=dataclasses.replace(config.pixel_decoder, encoder_layers=1),
        decoder=dataclasses.replace(config.decoder, num_layers=3),
    )
    return m2f.build_model(config).eval()


def test_tiny_mask2former_matches_pytorch(tmp_path):
    model = tiny_mask2former()
    images = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        expected = model(images)
    pred_logits, pred_masks = export_and_run(
        model, (images,), tmp_path / "mask2former.onnx", output_names=["pred_logits", "pred_masks"]
    )
    model_ops = {node.op_type for node in onnx.load(tmp_path / "mask2former.onnx").graph.node}
    assert "GridSample" in model_ops  # the deformable attention went through our translation
    torch.testing.assert_close(pred_logits, expected["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred_masks, expected["pred_masks"], atol=1e-5, rtol=1e-5)


def test_tiny_mask2former_exported_with_a_dynamic_size_matches_pytorch_at_every_size(tmp_path):
    """One graph exported from a 64 x 96 example (no padding to the stride of 32) with dynamic batch, height
    and width: right at sizes that need padding and at a batch of 2 too, masks cropped to ceil(size / 4)."""
    model = tiny_mask2former()
    dims = {
        0: torch.export.Dim("batch"),
        2: torch.export.Dim("height", min=32),
        3: torch.export.Dim("width", min=32),
    }
    path = tmp_path / "mask2former.onnx"
    m2f_onnx.export(
        model,
        (torch.rand(1, 3, 64, 96) * 255,),
        path,
        input_names=["images"],
        output_names=["pred_logits", "pred_masks"],
        dynamic_shapes={"images": dims},
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, height, width in [(1, 64, 96), (1, 100, 75), (2, 37, 130), (1, 33, 33)]:
        images = torch.rand(batch, 3, height, width) * 255
        with torch.no_grad():
            expected = model(images)
        pred_logits, pred_masks = session.run(None, {"images": images.numpy()})
        assert pred_masks.shape == (batch, 16, -(-height // 4), -(-width // 4))
        torch.testing.assert_close(
            torch.from_numpy(pred_logits), expected["pred_logits"], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(torch.from_numpy(pred_masks), expected["pred_masks"], atol=1e-5, rtol=1e-5)
