"""patch_transformers: transformers' deformable and masked attention on m2f_kernels, same outputs, reversible."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from m2f_kernels.integrations import is_patched, patch_transformers, unpatch_transformers  # noqa: E402


def _mask2former(num_labels: int = 3, dtype=torch.float64):
    config = transformers.Mask2FormerConfig(
        backbone_config=transformers.SwinConfig(
            embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        num_labels=num_labels, num_queries=6, decoder_layers=3, encoder_layers=2, feature_size=32,
        mask_feature_size=32, hidden_dim=32, dim_feedforward=64, encoder_feedforward_dim=64,
        num_attention_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval().to(dtype)
    # non-trivial sampling offsets and attention logits (the init makes them input-independent)
    for name, param in model.named_parameters():
        if "sampling_offsets.weight" in name or "attention_weights.weight" in name:
            param.data.normal_(0.0, 0.5)
    return model


def deformable_attentions(model):
    return [m for m in model.modules() if type(m).__name__.endswith("MultiscaleDeformableAttention")]


def decoder_layers(model):
    return [m for m in model.modules() if type(m).__name__ == "Mask2FormerMaskedAttentionDecoderLayer"]


def cross_attentions(model):
    return [layer.cross_attn for layer in decoder_layers(model)]


def loss_modules(model):
    return [
        m for m in model.modules() if type(m).__name__ in ("Mask2FormerLoss", "Mask2FormerHungarianMatcher")
    ]


def tensors(output) -> list[torch.Tensor]:
    """Every tensor of a transformers output, in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    items = output.to_tuple() if hasattr(output, "to_tuple") else output
    if not isinstance(items, (tuple, list)):
        return []
    return [t for item in items for t in tensors(item)]


def test_mask2former_outputs_unchanged_and_reversible():
    model = _mask2former()
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    classes = {m: type(m) for m in model.modules()}
    with torch.no_grad():
        before = model(pixel_values=images)
        patched = patch_transformers(model, backend="torch")
        after = model(pixel_values=images)
    attention_modules = [
        *deformable_attentions(model),
        *decoder_layers(model),
        *cross_attentions(model),
        *loss_modules(model),
    ]
    assert len(deformable_attentions(model)) == model.config.encoder_layers
    assert len(cross_attentions(model)) == model.config.decoder_layers - 1
    assert len(loss_modules(model)) == 2
    assert len(attention_modules) == patched and all(is_patched(m) for m in attention_modules)
    assert all(
        type(m).__name__ == classes[m].__name__ and isinstance(m, classes[m]) for m in attention_modules
    )
    torch.testing.assert_close(
        after.class_queries_logits, before.class_queries_logits, rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(
        after.masks_queries_logits, before.masks_queries_logits, rtol=1e-10, atol=1e-10
    )

    assert unpatch_transformers(model) == patched
    assert not any(is_patched(m) for m in attention_modules)
    assert all(type(m) is classes[m] for m in attention_modules)
    assert all("_m2f_kernels_backend" not in m.__dict__ for m in attention_modules)


def count_calls(monkeypatch, op_name: str) -> list:
    import m2f_kernels

    calls = []
    original = getattr(m2f_kernels, op_name)

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(m2f_kernels, op_name, counting)
    return calls


def test_patched_forward_calls_the_ops(monkeypatch):
    deform_calls = count_calls(monkeypatch, "ms_deform_attn")
    masked_calls = count_calls(monkeypatch, "masked_attention")
    model = _mask2former()
    patch_transformers(model, backend="torch")
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert deform_calls == ["torch"] * model.config.encoder_layers
    assert masked_calls == ["torch"] * (model.config.decoder_layers - 1)


def test_attention_weights_asked_for_come_from_torch(monkeypatch):
    """With output_attentions=True the decoder keeps the cross-attention weights: the patched module then
    runs nn.MultiheadAttention's forward, and every output, weights included, is unchanged."""
    masked_calls = count_calls(monkeypatch, "masked_attention")
    model = _mask2former()
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before = tensors(model(pixel_values=images, output_attentions=True))
        patch_transformers(model, backend="cpu")
        after = tensors(model(pixel_values=images, output_attentions=True))
        assert masked_calls == []
        model(pixel_values=images)
    assert masked_calls == ["cpu"] * (model.config.decoder_layers - 1)
    assert len(after) == len(before) > 2
    for got, expected in zip(after, before):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_cross_attention_called_directly_is_torch_multihead_attention(monkeypatch):
    """Outside its decoder layer's call the patched cross_attn runs nn.MultiheadAttention's own forward,
    weights and fully blocked rows (zeros there, not every key) included."""
    masked_calls = count_calls(monkeypatch, "masked_attention")
    model = _mask2former()
    attention = cross_attentions(model)[0]
    query, key = torch.randn(6, 2, 32, dtype=torch.float64), torch.randn(10, 2, 32, dtype=torch.float64)
    blocked = torch.rand(4, 6, 10) < 0.5
    blocked[:, 2] = True
    expected = attention(query, key, key)
    expected_blocked = attention(query, key, key, attn_mask=blocked, need_weights=False)[0]
    patch_transformers(model, backend="cpu")
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert len(masked_calls) == model.config.decoder_layers - 1
    got = attention(query, key, key)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    got_blocked = attention(query, key, key, attn_mask=blocked, need_weights=False)[0]
    torch.testing.assert_close(got_blocked, expected_blocked, rtol=0, atol=0)
    assert len(masked_calls) == model.config.decoder_layers - 1


def test_copies_stay_patched_and_correct():
    """copy.deepcopy (EMA and SWA copies) and nn.DataParallel replicas keep the patch, bound to themselves."""
    import copy

    model = _mask2former()
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(pixel_values=images, output_attentions=True)
        patch_transformers(model, backend="cpu")
        twin = copy.deepcopy(model)
        got = twin(pixel_values=images, output_attentions=True)
        got_plain = twin(pixel_values=images)
    assert all(is_patched(m) for m in cross_attentions(twin))
    for actual, wanted in zip(tensors(got), tensors(expected)):
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        got_plain.masks_queries_logits, expected.masks_queries_logits, rtol=1e-10, atol=1e-10
    )
    replica = cross_attentions(model)[0]._replicate_for_data_parallel()
    assert is_patched(replica) and replica.forward.__self__ is replica
    assert unpatch_transformers(twin) == unpatch_transformers(model) > 0


def test_gradients_unchanged():
    model = _mask2former()
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)

    def grads():
        model.zero_grad()
        model(pixel_values=images).masks_queries_logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    patch_transformers(model, backend="torch")
    patched = grads()
    assert any("cross_attn" in name for name in reference)
    for name, grad in reference.items():
        torch.testing.assert_close(patched[name], grad, rtol=1e-8, atol=1e-10, msg=name)


def test_deformable_detr_kernel_module():
    config = transformers.DeformableDetrConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, num_feature_levels=2, encoder_n_points=2,
        decoder_n_points=2, use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
            out_features=["stage3", "stage4"],
        ),
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DeformableDetrModel(config).eval().double()
    for name, param in model.named_parameters():
        if "sampling_offsets.weight" in name:
            param.data.normal_(0.0, 0.5)
    images = torch.randn(1, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        before = model(pixel_values=images).last_hidden_state
        patched = patch_transformers(model, backend="torch")
        after = model(pixel_values=images).last_hidden_state
    kernels = [m for m in model.modules() if type(m).__name__ == "MultiScaleDeformableAttention"]
    assert patched == len(kernels) == 2  # one encoder and one decoder layer
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)
    assert unpatch_transformers(model) == 2


def _pixel_decoder_attention(width=160):
    """Mask2Former's pixel-decoder deformable attention on one 24 x width level, with its call arguments."""
    from transformers.models.mask2former import modeling_mask2former

    torch.manual_seed(0)
    attention = modeling_mask2former.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(32, 2, 1, 4)
    with torch.no_grad():
        for param in attention.parameters():
            param.normal_(0.0, 0.05)
        attention.sampling_offsets.bias.normal_(0.0, 2.0)
    rows, columns = torch.meshgrid(torch.arange(24.0), torch.arange(float(width)), indexing="ij")
    features = torch.stack([torch.sin(columns * 0.7 + k) + torch.cos(rows * 0.9 - k) for k in range(32)], -1)
    reference = torch.stack([torch.rand(100) * 0.98 + 0.01, torch.rand(100) * 0.98 + 0.01], -1)
    inputs = {
        "hidden_states": torch.randn(1, 100, 32),
        "encoder_hidden_states": features.reshape(1, 24 * width, 32),
        "reference_points": reference[None, :, None, :],
        "spatial_shapes_list": [(24, width)],
        "level_start_index": torch.tensor([0]),
    }
    return attention, inputs


def test_deformable_attention_samples_in_float32_under_autocast():
    """transformers samples at float32 locations under autocast (its grid_sample runs in float32); so does the
    patched module: 16-bit locations would move samples by up to 0.3 pixel of a 160-pixel level."""
    attention, inputs = _pixel_decoder_attention()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attention(**inputs)[0]
        patch_transformers(attention, backend="torch")
        got = attention(**inputs)[0]
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=4e-3)


def test_patched_pixel_decoder_attention_exports():
    """The level sizes come from spatial_shapes_list, not from reading a tensor, so torch.export and
    torch.compile(fullgraph=True) trace the patched module."""
    attention, inputs = _pixel_decoder_attention(width=20)
    patch_transformers(attention, backend="torch")
    with torch.no_grad():
        expected = attention(**inputs)[0]
    exported = torch.export.export(attention, (), kwargs=inputs)
    torch.testing.assert_close(exported.module()(**inputs)[0], expected)


def test_model_without_deformable_attention_and_bad_input():
    assert patch_transformers(torch.nn.Linear(2, 2)) == 0
    with pytest.raises(TypeError, match="model"):
        patch_transformers("not a model")


def test_patch_twice_keeps_the_original():
    model = _mask2former()
    patch_transformers(model, backend="torch")
    classes = {m: type(m) for m in model.modules()}
    patched = patch_transformers(model, backend="cpu")
    # deformable attention, decoder layers and their cross_attn, the loss and the matcher
    assert patched == model.config.encoder_layers + 2 * (model.config.decoder_layers - 1) + 2
    assert {m: type(m) for m in model.modules()} == classes  # not a subclass of a subclass
    assert all(m._m2f_kernels_backend == "cpu" for m in model.modules() if is_patched(m))
    assert unpatch_transformers(model) == patched
    assert unpatch_transformers(model) == 0


def _targets(num_targets=(3, 2), size=(64, 64), num_labels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask_labels, class_labels = [], []
    for count in num_targets:
        owner = torch.randint(0, count + 1, (size[0] // 8, size[1] // 8), generator=generator)
        owner = owner.repeat_interleave(8, 0).repeat_interleave(8, 1)
        mask_labels.append((owner[None] == torch.arange(count)[:, None, None]).float())
        class_labels.append(torch.randint(0, num_labels, (count,), generator=generator))
    return mask_labels, class_labels


@pytest.mark.parametrize("num_targets", [(3, 2), (2, 0)])
def test_training_loss_and_gradients_unchanged(monkeypatch, num_targets):
    """Same seed, same sampled points: the loss of the patched model (fused point loss, fused matcher costs)
    and every parameter gradient equal the original's up to rounding (float32: transformers' loss
    samples float32 points)."""
    loss_calls = count_calls(monkeypatch, "point_mask_loss")
    cost_calls = count_calls(monkeypatch, "pairwise_mask_cost")
    model = _mask2former(dtype=torch.float32)
    images = torch.randn(2, 3, 64, 64)
    mask_labels, class_labels = _targets(num_targets)

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(7)
        loss = model(pixel_values=images, mask_labels=mask_labels, class_labels=class_labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    assert loss_calls == cost_calls == []
    patch_transformers(model, backend="cpu")
    patched_loss, patched_grads = loss_and_grads()
    layers = model.config.decoder_layers  # deep supervision: every decoder layer and the initial prediction
    assert loss_calls == ["cpu"] * layers and cost_calls == ["cpu"] * layers * len(num_targets)
    torch.testing.assert_close(patched_loss, loss, rtol=1e-5, atol=1e-6)
    assert patched_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(patched_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_matcher_assignments_unchanged():
    model = _mask2former(num_labels=4, dtype=torch.float32)
    matcher = model.criterion.matcher
    generator = torch.Generator().manual_seed(3)
    masks = torch.randn(2, 6, 16, 16, generator=generator) * 3
    classes = torch.randn(2, 6, 5, generator=generator)
    mask_labels, class_labels = _targets((4, 1), size=(64, 64), num_labels=4, seed=4)
    torch.manual_seed(1)
    expected = matcher(masks, classes, mask_labels, class_labels)
    patch_transformers(model, backend="torch")
    torch.manual_seed(1)
    got = matcher(masks, classes, mask_labels, class_labels)
    assert [len(rows) for rows, _ in expected] == [4, 1]
    for (rows, columns), (expected_rows, expected_columns) in zip(got, expected):
        assert rows.tolist() == expected_rows.tolist() and columns.tolist() == expected_columns.tolist()


def test_loss_masks_terms_unchanged():
    model = _mask2former(dtype=torch.float32)
    criterion = model.criterion
    masks = torch.randn(2, 6, 16, 16, generator=torch.Generator().manual_seed(5)) * 3
    mask_labels, _ = _targets((3, 2))
    indices = [
        (torch.tensor([4, 0, 2]), torch.tensor([1, 2, 0])),
        (torch.tensor([5, 1]), torch.tensor([0, 1])),
    ]
    num_masks = torch.tensor(5.0)
    torch.manual_seed(2)
    expected = criterion.loss_masks(masks, mask_labels, indices, num_masks)
    patch_transformers(model, backend="cpu")
    torch.manual_seed(2)
    got = criterion.loss_masks(masks, mask_labels, indices, num_masks)
    assert got.keys() == expected.keys() == {"loss_mask", "loss_dice"}
    assert abs(expected["loss_mask"] - expected["loss_dice"]) > 0.1
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.cuda
def test_cuda_outputs_and_loss_unchanged():
    model = _mask2former(dtype=torch.float32).cuda()
    images = torch.randn(2, 3, 64, 64, device="cuda")
    mask_labels, class_labels = _targets((3, 2))
    mask_labels = [m.cuda() for m in mask_labels]
    class_labels = [c.cuda() for c in class_labels]

    def run():
        torch.manual_seed(7)
        with torch.no_grad():
            return model(pixel_values=images, mask_labels=mask_labels, class_labels=class_labels)

    before = run()
    patch_transformers(model)
    after = run()
    torch.testing.assert_close(after.masks_queries_logits, before.masks_queries_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after.class_queries_logits, before.class_queries_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after.loss, before.loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_pixel_decoder_attention_with_boxes_padding_and_no_start_index(ref_dim):
    """Two levels, reference points as (x, y) or boxes (cx, cy, w, h), padded values (attention_mask True)
    and no level_start_index (the patched forward derives it from the level sizes): the same output and
    attention weights as transformers' own forward."""
    from transformers.models.mask2former import modeling_mask2former

    torch.manual_seed(0)
    attention = modeling_mask2former.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(32, 2, 2, 3)
    attention = attention.double()
    with torch.no_grad():
        for param in attention.parameters():
            param.normal_(0.0, 0.3)
        attention.sampling_offsets.bias.normal_(0.0, 2.0)
    shapes = [(6, 10), (3, 5)]
    num_values = sum(h * w for h, w in shapes)
    reference = torch.rand(2, 7, 2, ref_dim, dtype=torch.float64) * 0.8 + 0.1
    if ref_dim == 4:
        reference[..., 2:] *= 0.5  # box sizes
    padding = torch.zeros(2, num_values, dtype=torch.bool)
    padding[0, 40:60] = True
    padding[1, 60:] = True
    inputs = {
        "hidden_states": torch.randn(2, 7, 32, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(2, num_values, 32, dtype=torch.float64),
        "attention_mask": padding,
        "position_embeddings": torch.randn(2, 7, 32, dtype=torch.float64),
        "reference_points": reference,
        "spatial_shapes_list": shapes,
    }
    with torch.no_grad():
        expected = attention(**inputs)
        assert patch_transformers(attention, backend="torch") == 1
        got = attention(**inputs)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-9, atol=1e-9)
