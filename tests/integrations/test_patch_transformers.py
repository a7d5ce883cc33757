"""patch_transformers: transformers' deformable attention on m2f_kernels, same outputs, reversible."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from m2f_kernels.integrations import is_patched, patch_transformers, unpatch_transformers  # noqa: E402


def _mask2former(num_labels: int = 3):
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
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval().double()
    # non-trivial sampling offsets and attention logits (the init makes them input-independent)
    for name, param in model.named_parameters():
        if "sampling_offsets.weight" in name or "attention_weights.weight" in name:
            param.data.normal_(0.0, 0.5)
    return model


def test_mask2former_outputs_unchanged_and_reversible():
    model = _mask2former()
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        before = model(pixel_values=images)
        patched = patch_transformers(model, backend="torch")
        after = model(pixel_values=images)
    assert patched == model.config.encoder_layers
    attention_modules = [
        m for m in model.modules() if type(m).__name__.endswith("MultiscaleDeformableAttention")
    ]
    assert len(attention_modules) == patched and all(is_patched(m) for m in attention_modules)
    torch.testing.assert_close(
        after.class_queries_logits, before.class_queries_logits, rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(
        after.masks_queries_logits, before.masks_queries_logits, rtol=1e-10, atol=1e-10
    )

    assert unpatch_transformers(model) == patched
    assert not any(is_patched(m) for m in attention_modules)
    assert all("forward" not in m.__dict__ for m in attention_modules)


def test_patched_forward_calls_the_op(monkeypatch):
    import m2f_kernels

    calls = []
    original = m2f_kernels.ms_deform_attn

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(m2f_kernels, "ms_deform_attn", counting)
    model = _mask2former()
    patch_transformers(model, backend="torch")
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 64, 64, dtype=torch.float64))
    assert calls == ["torch"] * model.config.encoder_layers


def test_gradients_unchanged():
    model = _mask2former()
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)

    def grads():
        model.zero_grad()
        model(pixel_values=images).masks_queries_logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "pixel_level_module.decoder" in n}

    reference = grads()
    patch_transformers(model, backend="torch")
    patched = grads()
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


def test_model_without_deformable_attention_and_bad_input():
    assert patch_transformers(torch.nn.Linear(2, 2)) == 0
    with pytest.raises(TypeError, match="model"):
        patch_transformers("not a model")


def test_patch_twice_keeps_the_original():
    model = _mask2former()
    patch_transformers(model, backend="torch")
    patch_transformers(model, backend="torch")
    assert unpatch_transformers(model) == model.config.encoder_layers
    assert unpatch_transformers(model) == 0
