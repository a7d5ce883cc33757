"""m2f_kernels.nn.MaskedMultiheadAttention against torch.nn.MultiheadAttention loaded with the same weights."""

import pytest
import torch
from torch import nn

import m2f_kernels
from m2f_kernels.nn import MaskedMultiheadAttention
from m2f_kernels.reference.masked_attention import threshold_to_logit

EMBED, HEADS, BATCH, QUERIES, KEYS = 32, 2, 2, 5, 9  # head dim 16, which the GPU kernels take
BACKENDS = [b for b in ("cpu", "triton", "torch") if b in m2f_kernels.available_backends()]


def make_pair(bias=True, batch_first=False, backend="auto", dtype=torch.float32, threshold=0.5):
    ours = MaskedMultiheadAttention(
        EMBED,
        HEADS,
        bias=bias,
        batch_first=batch_first,
        mask_threshold=threshold,
        backend=backend,
        dtype=dtype,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype) * 0.3)
    torch_mha = nn.MultiheadAttention(EMBED, HEADS, bias=bias, batch_first=batch_first, dtype=dtype)
    torch_mha.load_state_dict(ours.state_dict())
    return ours, torch_mha


def rule_applied(blocked: torch.Tensor) -> torch.Tensor:
    """Mask2Former's rule on a bool mask (True = blocked): a row blocking every key blocks none."""
    return blocked & ~blocked.all(dim=-1, keepdim=True)


def inputs(batch_first, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, QUERIES, EMBED, generator=generator, dtype=dtype)
    key = torch.randn(BATCH, KEYS, EMBED, generator=generator, dtype=dtype)
    value = torch.randn(BATCH, KEYS, EMBED, generator=generator, dtype=dtype)
    if not batch_first:
        query, key, value = (x.transpose(0, 1).contiguous() for x in (query, key, value))
    return [x.requires_grad_() for x in (query, key, value)]


def mask_logits_with_edge_rows(seed=2):
    logits = torch.randn(BATCH, QUERIES, KEYS, generator=torch.Generator().manual_seed(seed))
    logits[0, 1] = -3.0  # sees no key
    logits[1, 2] = 3.0  # sees every key
    logits[1, 3] = -3.0
    logits[1, 3, 4] = 3.0  # sees one key
    return logits


def assert_same_outputs_and_gradients(ours, torch_mha, args, our_kwargs, torch_kwargs, tol=1e-5):
    """Outputs within tol; gradients, which sum over batch, queries and keys, within 10 * tol."""
    out, weights = ours(*args, **our_kwargs)
    expected, _ = torch_mha(*args, need_weights=False, **torch_kwargs)
    assert weights is None
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    ours_grads = torch.autograd.grad(out, [*args, *ours.parameters()], grad)
    torch_grads = torch.autograd.grad(expected, [*args, *torch_mha.parameters()], grad)
    for name, mine, theirs in zip(
        ["query", "key", "value", *(n for n, _ in ours.named_parameters())], ours_grads, torch_grads
    ):
        torch.testing.assert_close(
            mine, theirs, rtol=10 * tol, atol=10 * tol, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_mask_logits_match_torch_with_the_rule_applied(backend, batch_first):
    ours, torch_mha = make_pair(batch_first=batch_first, backend=backend)
    logits = mask_logits_with_edge_rows()
    blocked = rule_applied(logits.sigmoid() < 0.5).repeat_interleave(HEADS, dim=0)
    assert_same_outputs_and_gradients(
        ours, torch_mha, inputs(batch_first), {"mask_logits": logits}, {"attn_mask": blocked}
    )


@pytest.mark.parametrize("threshold", [0.2, 0.8])
def test_mask_threshold(threshold):
    ours, torch_mha = make_pair(batch_first=True, threshold=threshold)
    logits = torch.randn(BATCH, QUERIES, KEYS, generator=torch.Generator().manual_seed(3)) * 2
    blocked = rule_applied(logits.sigmoid() < threshold)
    assert blocked.any() and not blocked.all()
    assert_same_outputs_and_gradients(
        ours,
        torch_mha,
        inputs(True),
        {"mask_logits": logits},
        {"attn_mask": blocked.repeat_interleave(HEADS, dim=0)},
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_head", [False, True])
def test_bool_attn_mask_as_torch_takes_it(backend, per_head):
    """detectron2's Mask2Former passes a (B * H, Q, K) bool mask with the rule already applied."""
    ours, torch_mha = make_pair(backend=backend)
    shape = (BATCH * HEADS, QUERIES, KEYS) if per_head else (QUERIES, KEYS)
    blocked = rule_applied(torch.rand(shape, generator=torch.Generator().manual_seed(4)) < 0.6)
    assert_same_outputs_and_gradients(
        ours, torch_mha, inputs(False), {"attn_mask": blocked}, {"attn_mask": blocked}
    )


def test_fully_blocked_row_attends_to_every_key():
    ours, torch_mha = make_pair()
    blocked = torch.zeros(QUERIES, KEYS, dtype=torch.bool)
    blocked[2] = True
    args = inputs(False)
    expected_row = torch_mha(*args, need_weights=False)[0][2]
    out, _ = ours(*args, attn_mask=blocked)
    torch_blocked_row = torch_mha(*args, attn_mask=blocked, need_weights=False)[0][2]
    torch.testing.assert_close(torch_blocked_row, torch_mha.out_proj.bias.expand_as(torch_blocked_row))
    torch.testing.assert_close(out[2], expected_row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "attn_mask", "mask_logits"])
def test_key_padding_mask(mask_kind):
    """Padded keys are never attended: a query that sees only padded keys (row 1 of image 0) or no key
    (row 2 of image 1) attends to every unpadded key."""
    ours, torch_mha = make_pair(batch_first=True)
    padding = torch.zeros(BATCH, KEYS, dtype=torch.bool)
    padding[0, -3:] = True
    padding[1, 0] = True
    logits = torch.randn(BATCH, QUERIES, KEYS, generator=torch.Generator().manual_seed(5))
    logits[0, 1] = -2.0
    logits[0, 1, -2:] = 2.0  # visible keys, all padded
    logits[1, 2] = -2.0
    blocked = logits.sigmoid() < 0.5
    our_kwargs = {"key_padding_mask": padding}
    if mask_kind == "attn_mask":
        our_kwargs["attn_mask"] = blocked.repeat_interleave(HEADS, dim=0)
    elif mask_kind == "mask_logits":
        our_kwargs["mask_logits"] = logits
    if mask_kind == "none":
        blocked = torch.zeros_like(blocked)
    expected = blocked | padding[:, None, :]
    for image, row in ((0, 1), (1, 2)):
        if mask_kind != "none":
            assert expected[image, row].all()
        expected[image, row] = padding[image]
    assert not expected.all(-1).any()
    assert_same_outputs_and_gradients(
        ours,
        torch_mha,
        inputs(True),
        our_kwargs,
        {"attn_mask": expected.repeat_interleave(HEADS, dim=0)},
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_mask_with_half_precision_logits(backend):
    """float16 logits are compared with the threshold in float32, by the padding rule as by the kernel: a row
    whose unpadded keys sit just below logit(0.4) (float16 has no value at it) sees none of them, so it
    attends to every unpadded key, never to the padded ones."""
    threshold = 0.4
    ours, torch_mha = make_pair(batch_first=True, backend=backend, threshold=threshold)
    threshold_logit = threshold_to_logit(threshold)
    just_below = torch.tensor(threshold_logit).half()
    assert just_below.item() < threshold_logit
    padding = torch.zeros(BATCH, KEYS, dtype=torch.bool)
    padding[0, -3:] = True
    logits = torch.randn(BATCH, QUERIES, KEYS, generator=torch.Generator().manual_seed(5)).half()
    logits[0, 1] = just_below
    logits[0, 1, -3:] = 2.0  # visible keys, all padded
    expected = ~(logits.float() >= threshold_logit) | padding[:, None, :]
    expected[0, 1] = padding[0]
    assert not expected.all(-1).any()
    assert_same_outputs_and_gradients(
        ours,
        torch_mha,
        inputs(True),
        {"key_padding_mask": padding, "mask_logits": logits},
        {"attn_mask": expected.repeat_interleave(HEADS, dim=0)},
    )


def test_without_bias_and_without_mask():
    ours, torch_mha = make_pair(bias=False)
    assert ours.in_proj_bias is None and ours.out_proj.bias is None
    assert_same_outputs_and_gradients(ours, torch_mha, inputs(False), {}, {})


def test_unbatched_inputs():
    ours, torch_mha = make_pair()
    query, key, value = (x.detach()[:, 0] for x in inputs(False))
    logits = mask_logits_with_edge_rows()[1]
    out, weights = ours(query, key, value, mask_logits=logits, need_weights=True)
    blocked = rule_applied(logits.sigmoid() < 0.5)
    expected, expected_weights = torch_mha(query, key, value, attn_mask=blocked)
    assert out.shape == (QUERIES, EMBED) and weights.shape == (QUERIES, KEYS)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("average", [True, False])
def test_need_weights(average):
    ours, torch_mha = make_pair(batch_first=True)
    logits = mask_logits_with_edge_rows()
    blocked = rule_applied(logits.sigmoid() < 0.5).repeat_interleave(HEADS, dim=0)
    args = inputs(True)
    _, weights = ours(*args, mask_logits=logits, need_weights=True, average_attn_weights=average)
    _, expected = torch_mha(*args, attn_mask=blocked, average_attn_weights=average)
    assert weights.shape == ((BATCH, QUERIES, KEYS) if average else (BATCH, HEADS, QUERIES, KEYS))
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("average", [True, False])
def test_gradients_flow_through_the_weights(average):
    """The weights were computed without autograd: a loss on them raised, one on output and weights lost the
    weights' term."""
    ours, torch_mha = make_pair(batch_first=True)
    logits = mask_logits_with_edge_rows()
    blocked = rule_applied(logits.sigmoid() < 0.5).repeat_interleave(HEADS, dim=0)
    ours_args, torch_args = inputs(True), inputs(True)
    out, weights = ours(*ours_args, mask_logits=logits, need_weights=True, average_attn_weights=average)
    expected, expected_weights = torch_mha(*torch_args, attn_mask=blocked, average_attn_weights=average)
    direction = torch.randn(weights.shape, generator=torch.Generator().manual_seed(3))
    (out.sum() + 10 * (weights * direction).sum()).backward()
    (expected.sum() + 10 * (expected_weights * direction).sum()).backward()
    for ours_input, torch_input in zip(ours_args, torch_args, strict=True):
        torch.testing.assert_close(ours_input.grad, torch_input.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.in_proj_weight.grad, torch_mha.in_proj_weight.grad, rtol=1e-5, atol=1e-5)


def test_weights_stay_float32_under_autocast():
    ours, _ = make_pair(batch_first=True)
    logits = mask_logits_with_edge_rows()
    args = [x.detach() for x in inputs(True)]
    _, expected = ours(*args, mask_logits=logits, need_weights=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, weights = ours(*args, mask_logits=logits, need_weights=True)
    assert weights.dtype == torch.float32
    # The projections run in bfloat16 under autocast, the product and softmax of the weights in float32.
    torch.testing.assert_close(weights, expected, rtol=0, atol=2e-2)


def test_float64_matches_and_gradcheck():
    ours, torch_mha = make_pair(batch_first=True, dtype=torch.float64)
    logits = mask_logits_with_edge_rows().double()
    blocked = rule_applied(logits.sigmoid() < 0.5).repeat_interleave(HEADS, dim=0)
    args = inputs(True, dtype=torch.float64)
    assert_same_outputs_and_gradients(
        ours, torch_mha, args, {"mask_logits": logits}, {"attn_mask": blocked}, tol=1e-10
    )
    small = [x.detach()[:, :3, :].clone().requires_grad_() for x in args]
    assert torch.autograd.gradcheck(lambda q, k, v: ours(q, k, v, mask_logits=logits[:, :3, :3])[0], small)


@pytest.mark.parametrize("queries", [0, QUERIES])
@pytest.mark.parametrize("keys", [0, KEYS])
@pytest.mark.parametrize("batch", [0, BATCH])
def test_empty_inputs_with_every_mask(batch, queries, keys):
    """Any of B, Q, K zero, with a per-head attn_mask, a key_padding_mask or both: shapes as
    nn.MultiheadAttention's; no key leaves out_proj's bias."""
    ours = MaskedMultiheadAttention(EMBED, HEADS)
    query, key = torch.randn(queries, batch, EMBED), torch.randn(keys, batch, EMBED)
    per_head = torch.zeros(batch * HEADS, queries, keys, dtype=torch.bool)
    padding = torch.zeros(batch, keys, dtype=torch.bool)
    for kwargs in (
        {"attn_mask": per_head},
        {"key_padding_mask": padding},
        {"attn_mask": per_head, "key_padding_mask": padding},
    ):
        out, _ = ours(query, key, key, **kwargs)
        assert out.shape == (queries, batch, EMBED)
        if keys == 0:
            torch.testing.assert_close(out, ours.out_proj.bias.expand_as(out))


def test_parameters_and_initialization_are_torch_multihead_attentions():
    torch.manual_seed(0)
    ours = MaskedMultiheadAttention(EMBED, HEADS)
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(EMBED, HEADS)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, tensor in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MaskedMultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="dropout"):
        MaskedMultiheadAttention(EMBED, HEADS, dropout=0.1)
    with pytest.raises(TypeError, match="positional"):  # the 5th is add_bias_kv for nn.MultiheadAttention
        MaskedMultiheadAttention(EMBED, HEADS, 0.0, True, True)
    ours = MaskedMultiheadAttention(EMBED, HEADS, batch_first=True)
    query, key, value = (x.detach() for x in inputs(True))
    with pytest.raises(ValueError, match="is_causal"):
        ours(query, key, value, is_causal=True)
    with pytest.raises(ValueError, match="key must have shape"):
        ours(query, key[..., :8], value)
    with pytest.raises(ValueError, match="all be batched"):
        ours(query, key[0], value)
    with pytest.raises(TypeError, match="attn_mask must be a bool"):
        ours(query, key, value, attn_mask=torch.zeros(QUERIES, KEYS))
    with pytest.raises(ValueError, match=rf"attn_mask must have shape \(5, 9\) or \({BATCH * HEADS}, 5, 9\)"):
        ours(query, key, value, attn_mask=torch.zeros(BATCH, QUERIES, KEYS, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-d attn_mask"):
        ours(query, key, value, attn_mask=torch.zeros(KEYS, QUERIES, dtype=torch.bool))
    with pytest.raises(ValueError, match="either attn_mask or mask_logits"):
        ours(
            query,
            key,
            value,
            attn_mask=torch.zeros(QUERIES, KEYS, dtype=torch.bool),
            mask_logits=torch.zeros(BATCH, QUERIES, KEYS),
        )
    with pytest.raises(ValueError, match="mask_logits must have shape"):
        ours(query, key, value, mask_logits=torch.zeros(BATCH, KEYS, QUERIES))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        ours(query, key, value, key_padding_mask=torch.zeros(BATCH, KEYS))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ours(query, key, value, key_padding_mask=torch.zeros(BATCH, QUERIES, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_logits must have shape"):
        ours(
            query,
            key,
            value,
            mask_logits=torch.zeros(BATCH, KEYS, QUERIES),
            key_padding_mask=torch.zeros(BATCH, KEYS, dtype=torch.bool),
        )


def test_errors_name_the_modules_arguments_in_the_shapes_passed():
    """Mismatched key/value batches and lengths were reported for the projected, head-split k and v; an
    unbatched mask was reported after an internal unsqueeze, or failed with "'list' object has no attribute
    'unsqueeze'"; a bad mask_threshold or backend passed the constructor."""
    query, key, value = (x.detach() for x in inputs(True))
    batch_first = MaskedMultiheadAttention(EMBED, HEADS, batch_first=True)
    with pytest.raises(ValueError, match=rf"key must have query's batch size {BATCH} in \(B, K, E\)"):
        batch_first(query, key[:1], value[:1])
    with pytest.raises(ValueError, match="key and value must have the same batch and length"):
        batch_first(query, key, torch.cat([value, value[:, :1]], dim=1))
    sequence_first = MaskedMultiheadAttention(EMBED, HEADS)
    with pytest.raises(ValueError, match=rf"key must have query's batch size {BATCH} in \(K, B, E\)"):
        sequence_first(query.transpose(0, 1), key.transpose(0, 1)[:, :1], value.transpose(0, 1)[:, :1])
    unbatched = (query[0], key[0], value[0])
    with pytest.raises(
        ValueError, match=rf"mask_logits must have shape \({QUERIES}, {KEYS}\) \(Q, K unbatched\)"
    ):
        batch_first(*unbatched, mask_logits=torch.zeros(QUERIES, KEYS + 1))
    with pytest.raises(TypeError, match=r"mask_logits must be a torch\.Tensor"):
        batch_first(*unbatched, mask_logits=torch.zeros(QUERIES, KEYS).tolist())
    with pytest.raises(TypeError, match=r"key_padding_mask must be a torch\.Tensor"):
        batch_first(*unbatched, key_padding_mask=[False] * KEYS)
    with pytest.raises(ValueError, match=rf"key_padding_mask must have shape \({KEYS}\)"):
        batch_first(*unbatched, key_padding_mask=torch.zeros(KEYS + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="threshold must be in"):
        MaskedMultiheadAttention(EMBED, HEADS, mask_threshold=2.0)
    with pytest.raises(TypeError, match="mask_threshold must be a real number"):
        MaskedMultiheadAttention(EMBED, HEADS, mask_threshold="0.5")
    with pytest.raises(ValueError, match="backend must be one of"):
        MaskedMultiheadAttention(EMBED, HEADS, backend="foo")


def test_compiles_without_graph_breaks():
    ours, _ = make_pair(batch_first=True)
    args = [x.detach() for x in inputs(True)]
    logits = mask_logits_with_edge_rows()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        compiled(*args, mask_logits=logits)[0], ours(*args, mask_logits=logits)[0], rtol=1e-6, atol=1e-6
    )


class TorchCrossAttentionLayer(nn.Module):
    """The call pattern of detectron2's Mask2Former CrossAttentionLayer (sequence first, bool memory_mask)."""

    def __init__(self):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(EMBED, HEADS, dropout=0.0)

    def forward(self, tgt, memory, memory_mask):
        return self.multihead_attn(
            query=tgt, key=memory, value=memory, attn_mask=memory_mask, key_padding_mask=None
        )[0]


def test_swaps_into_a_layer_written_for_torch_attention():
    """The recipe of docs/ops.md: same outputs, float64 weights kept exactly."""
    layer = TorchCrossAttentionLayer().double()
    with torch.no_grad():
        layer.multihead_attn.in_proj_weight.add_(1e-12)  # not representable in float32
    tgt, memory = inputs(False, dtype=torch.float64)[:2]
    blocked = rule_applied(
        torch.rand(BATCH * HEADS, QUERIES, KEYS, generator=torch.Generator().manual_seed(6)) < 0.6
    )
    expected = layer(tgt, memory, blocked)

    torch_attention = layer.multihead_attn
    attention = MaskedMultiheadAttention(torch_attention.embed_dim, torch_attention.num_heads)
    attention.to(torch_attention.in_proj_weight).load_state_dict(torch_attention.state_dict())
    layer.multihead_attn = attention

    assert torch.equal(attention.in_proj_weight, torch_attention.in_proj_weight)
    torch.testing.assert_close(layer(tgt, memory, blocked), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
def test_cuda_mask_logits_match_torch(backend):
    ours, torch_mha = make_pair(batch_first=True, backend=backend)
    ours, torch_mha = ours.cuda(), torch_mha.cuda()
    logits = mask_logits_with_edge_rows().cuda()
    blocked = rule_applied(logits.sigmoid() < 0.5).repeat_interleave(HEADS, dim=0)
    args = [x.detach().cuda().requires_grad_() for x in inputs(True)]
    assert_same_outputs_and_gradients(ours, torch_mha, args, {"mask_logits": logits}, {"attn_mask": blocked})


def test_export_with_dynamic_batch_and_sizes():
    """torch.export with dynamic batch, query and key counts; the program matches eager at other sizes."""
    ours = MaskedMultiheadAttention(EMBED, HEADS, batch_first=True).eval()
    batch, queries, keys = (torch.export.Dim(name, min=2, max=64) for name in ("batch", "queries", "keys"))

    def call_inputs(b, q, k):
        query, key, value = torch.randn(b, q, EMBED), torch.randn(b, k, EMBED), torch.randn(b, k, EMBED)
        return (query, key, value), {"mask_logits": torch.randn(b, q, k)}

    args, kwargs = call_inputs(3, 5, 9)
    dynamic = {
        "query": {0: batch, 1: queries},
        "key": {0: batch, 1: keys},
        "value": {0: batch, 1: keys},
        "mask_logits": {0: batch, 1: queries, 2: keys},
    }
    exported = torch.export.export(ours, args, kwargs, dynamic_shapes=dynamic)
    args, kwargs = call_inputs(7, 3, 20)
    torch.testing.assert_close(exported.module()(*args, **kwargs)[0], ours(*args, **kwargs)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_threshold_is_one_half_inclusive(backend):
    """Without mask_threshold a key is visible iff sigmoid(logit) >= 0.5, Mask2Former's rule: logit 0 is
    visible, logits just below 0 (sigmoid 0.40..0.49) are blocked."""
    ours = MaskedMultiheadAttention(EMBED, HEADS, batch_first=True, backend=backend)
    assert ours.mask_threshold == 0.5
    paired, torch_mha = make_pair(batch_first=True)
    ours.load_state_dict(paired.state_dict())
    generator = torch.Generator().manual_seed(5)
    logits = -0.4 * torch.rand(BATCH, QUERIES, KEYS, generator=generator)  # sigmoid in (0.40, 0.5]
    logits[:, :, ::3] = 0.0
    logits[0, 0] = -0.1  # blocks every key: sees all of them
    blocked = rule_applied(logits < 0)
    assert blocked.any() and not blocked.all()
    assert_same_outputs_and_gradients(
        ours,
        torch_mha,
        inputs(True),
        {"mask_logits": logits},
        {"attn_mask": blocked.repeat_interleave(HEADS, dim=0)},
    )


def test_square_two_dimensional_attn_mask_is_not_transposed():
    """A (Q, K) mask with Q == K, not symmetric (causal): row i is query i, as torch reads it."""
    ours, torch_mha = make_pair(batch_first=True)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(BATCH, 5, EMBED, generator=generator).requires_grad_()
    blocked = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert_same_outputs_and_gradients(
        ours, torch_mha, [x, x, x], {"attn_mask": blocked}, {"attn_mask": blocked}
    )
