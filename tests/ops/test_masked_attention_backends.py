"""masked_attention kernels (C++ CPU, Triton, CUDA) against the float64 reference (DESIGN.md 2.2).

Every backend kernel is called with the kernel signature (q, k, v, mask_logits, attn_mask, threshold_logit,
scale) and checked against softmax(q k^T * scale + mask) v of m2f_kernels.reference in float64 on the same
(rounded) inputs: output, log-sum-exp and the gradients of q, k and v.
"""

import functools
import math

import pytest
import torch
from kernel_backends import cpu_kernel_backends

import m2f_kernels
from m2f_kernels.ops.masked_attention import KERNELS
from m2f_kernels.reference.masked_attention import blocked_keys, masked_attention, threshold_to_logit

CPU_KERNEL_BACKENDS = cpu_kernel_backends("masked_attention")
HAS_CPU_KERNEL = "cpu" in CPU_KERNEL_BACKENDS
HAS_TRITON_ON_CPU = "triton" in CPU_KERNEL_BACKENDS
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="C++ CPU kernel not built")
needs_triton = pytest.mark.skipif(not HAS_TRITON_ON_CPU, reason="Triton (interpreter) not available")

# (atol, rtol) of a backend against the float64 reference on the same rounded inputs. Low-precision outputs
# and gradients are rounded once to their dtype (Triton also rounds P and dS before its matrix products).
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
LSE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
ATTENTION_KERNELS = ("_forward_kernel", "_backward_dkdv_kernel")  # Triton, autotuned (not deterministic)


def mask_threshold(dtype):
    """A threshold whose logit the dtype represents exactly (0.5 -> 0 for 16-bit logits)."""
    return 0.3 if dtype in (torch.float32, torch.float64) else 0.5


def make_mask_logits(batch, queries, keys, threshold_logit, dtype, device="cpu"):
    """Mask logits (B, Q, K) covering the row cases of the Mask2Former rule.

    Row 0: every key blocked; row 1: every key visible; row 2: one visible key, exactly at the threshold;
    row 3: NaN logits with a few visible keys; row 4: only NaN (fully blocked); other rows: random density in
    [0, 1], with some logits exactly at the threshold.
    """
    density = torch.rand(batch, queries, 1, dtype=torch.float64)
    visible = torch.rand(batch, queries, keys, dtype=torch.float64) < density
    magnitude = torch.rand(batch, queries, keys, dtype=torch.float64) * 4 + 0.01
    logits = threshold_logit + torch.where(visible, magnitude, -magnitude)
    logits[torch.rand(batch, queries, keys) < 0.05] = threshold_logit
    special_rows = min(queries, 5)
    logits[:, :special_rows] = threshold_logit - 1.0
    if special_rows > 1:
        logits[:, 1] = threshold_logit + 1.0
    if special_rows > 2:
        logits[:, 2, keys // 2] = threshold_logit
    if special_rows > 3:
        logits[:, 3, ::3] = math.nan
        logits[:, 3, 1::7] = threshold_logit + 0.5
    if special_rows > 4:
        logits[:, 4] = math.nan
    return logits.to(device=device, dtype=dtype)


def make_inputs(batch, heads, queries, keys, head_dim, dtype, device="cpu"):
    q = torch.randn(batch, heads, queries, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, heads, keys, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, heads, keys, head_dim, dtype=dtype, device=device)
    grad_out = torch.randn(batch, heads, queries, head_dim, dtype=dtype, device=device)
    return q, k, v, grad_out


def reference_results(q, k, v, grad_out, mask_logits, attn_mask, threshold, scale):
    """Float64 reference: output, lse and the gradients of q, k and v."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    logits64 = None if mask_logits is None else mask_logits.double()
    out, _ = masked_attention(q64, k64, v64, logits64, attn_mask, threshold, scale)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double())
    blocked = blocked_keys(logits64, attn_mask, threshold_to_logit(threshold))
    scores = (q64.detach() @ k64.detach().transpose(-1, -2)) * scale
    lse = scores.masked_fill(blocked, -math.inf).logsumexp(dim=-1)
    return out.detach(), lse, grads


def run_backend(
    backend, q, k, v, grad_out, mask_logits, attn_mask, threshold_logit, scale, deterministic=None, **options
):
    """Forward and backward of one backend's kernels; the backward's `deterministic` is torch's setting, as
    the op passes it (off by default: the Triton launches autotune on a GPU and add dq with atomics), unless
    given."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if options:  # direct Triton call with launch options (key splits, config)
        from m2f_kernels.triton import masked_attention as triton_kernels

        forward = functools.partial(triton_kernels.masked_attention_forward, **options)
        backward = functools.partial(triton_kernels.masked_attention_backward, **options)
    else:
        forward = KERNELS.get(backend, q.device, "forward")
        backward = KERNELS.get(backend, q.device, "backward")
    out, lse = forward(q, k, v, mask_logits, attn_mask, threshold_logit, scale)
    grads = backward(
        grad_out, q, k, v, out, lse, mask_logits, attn_mask, threshold_logit, scale, deterministic
    )
    return out, lse, grads


def check_backend(backend, dtype, shape, mask_kind, device="cpu", deterministic=None, **options):
    """Runs one backend on one shape and mask kind and compares everything with the reference."""
    batch, heads, queries, keys, head_dim = shape
    q, k, v, grad_out = make_inputs(batch, heads, queries, keys, head_dim, dtype, device)
    threshold = mask_threshold(dtype)
    threshold_logit = threshold_to_logit(threshold)
    logits = make_mask_logits(batch, queries, keys, threshold_logit, dtype, device)
    mask_logits, attn_mask = logits, None
    if mask_kind == "bool":
        mask_logits, attn_mask = None, ~(logits.double() >= threshold_logit).unsqueeze(1)
    elif mask_kind == "bool_per_head":
        per_head = torch.rand(batch, heads, queries, keys, device=device) < torch.rand(
            batch, heads, queries, 1, device=device
        )
        per_head[:, 0, 0] = True  # a fully blocked row in one head only
        mask_logits, attn_mask = None, per_head
    scale = head_dim**-0.5

    out, lse, grads = run_backend(
        backend, q, k, v, grad_out, mask_logits, attn_mask, threshold_logit, scale, deterministic, **options
    )
    ref_out, ref_lse, ref_grads = reference_results(
        q, k, v, grad_out, mask_logits, attn_mask, threshold, scale
    )
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (batch, heads, queries)
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOLERANCE[dtype], rtol=LSE_TOLERANCE[dtype])
    for name, grad, ref_grad in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
        assert grad.dtype == dtype, name
        torch.testing.assert_close(
            grad.double(), ref_grad, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )


# (B, H, Q, K, d): Q in {1, 100, 200}, K in {1, 7, 1024, 4097}, d in {16, 32, 64}.
CPU_SHAPES = [
    (2, 2, 1, 1, 32),
    (2, 2, 1, 4097, 16),
    (1, 2, 100, 7, 32),
    (1, 2, 100, 1024, 32),
    (1, 2, 100, 4097, 32),
    (1, 2, 200, 1, 64),
    (1, 2, 200, 1024, 64),
    (1, 1, 200, 4097, 16),
    (2, 3, 9, 130, 64),
]
TRITON_SHAPES = [(1, 2, 1, 1, 16), (2, 2, 5, 7, 32), (1, 2, 33, 100, 64)]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_cpu_kernel_matches_reference(dtype, shape):
    check_backend("cpu", dtype, shape, "logits")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "bool_per_head"])
@pytest.mark.parametrize("shape", [(2, 2, 100, 1024, 32), (1, 3, 7, 33, 16)])
def test_cpu_kernel_bool_masks_match_reference(dtype, mask_kind, shape):
    check_backend("cpu", dtype, shape, mask_kind)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [1, 3, 20, 40])
def test_cpu_kernel_takes_any_head_dim(dtype, head_dim):
    """The CPU kernel runs head dims the GPU kernels do not (e.g. 192 / 8 = 24): the columns beyond the last
    whole vector of lanes go one at a time, added to the running output over 600 keys (two key chunks)."""
    check_backend("cpu", dtype, (1, 2, 9, 600, head_dim), "logits")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("mask_kind", ["logits", "bool", "bool_per_head"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_kernel"])
def test_triton_matches_reference(dtype, shape, mask_kind, deterministic):
    check_backend("triton", dtype, shape, mask_kind, deterministic=deterministic)


@needs_triton
@pytest.mark.parametrize("num_splits", [2, 3])
@pytest.mark.parametrize("mask_kind", ["logits", "bool_per_head"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_kernel"])
def test_triton_split_keys_match_reference(num_splits, mask_kind, deterministic):
    """150 keys: the last split and the last key block are partial. The splits serve the forward and the
    deterministic backward's dq kernel."""
    check_backend(
        "triton",
        torch.float32,
        (1, 2, 40, 150, 32),
        mask_kind,
        deterministic=deterministic,
        num_splits=num_splits,
    )


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["logits", "bool_per_head"])
@pytest.mark.parametrize(
    "shape", [(2, 2, 1, 4097, 16), (1, 2, 100, 1024, 32), (2, 3, 9, 130, 64), (1, 2, 9, 600, 6)]
)
def test_cpu_kernel_lower_instruction_sets_match_reference(monkeypatch, isa, dtype, mask_kind, shape):
    """The kernels compiled for x86-64-v3 (AVX2) and baseline x86-64, which have their own vector widths and
    tiles; M2F_KERNELS_CPU_ISA lowers the level the CPU would get (other CPUs always run the baseline)."""
    monkeypatch.setenv("M2F_KERNELS_CPU_ISA", isa)
    check_backend("cpu", dtype, shape, mask_kind)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bool_mask_and_logits_give_identical_results(backend, dtype):
    batch, heads, queries, keys, head_dim = 2, 2, 9, 70, 32
    q, k, v, grad_out = make_inputs(batch, heads, queries, keys, head_dim, dtype)
    threshold_logit = threshold_to_logit(0.5)
    logits = make_mask_logits(batch, queries, keys, threshold_logit, dtype)
    blocked = ~(logits.float() >= threshold_logit)
    scale = head_dim**-0.5
    from_logits = run_backend(backend, q, k, v, grad_out, logits, None, threshold_logit, scale)
    shared = run_backend(backend, q, k, v, grad_out, None, blocked.unsqueeze(1), threshold_logit, scale)
    per_head = blocked.unsqueeze(1).expand(batch, heads, queries, keys).contiguous()
    from_per_head = run_backend(backend, q, k, v, grad_out, None, per_head, threshold_logit, scale)
    for other in (shared, from_per_head):
        assert torch.equal(from_logits[0], other[0])
        assert torch.equal(from_logits[1], other[1])
        for a, b in zip(from_logits[2], other[2]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_fully_blocked_row_attends_to_all_keys(backend):
    """Hand-built case: the output of a fully blocked row is plain softmax attention over every key."""
    q, k, v, grad_out = make_inputs(1, 2, 3, 5, 16, torch.float32)
    logits = torch.full((1, 3, 5), -3.0)
    logits[0, 1, 2] = 3.0  # row 1 sees key 2 only; rows 0 and 2 see nothing
    out, lse, _ = run_backend(backend, q, k, v, grad_out, logits, None, 0.0, 0.25)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    unmasked = scores.softmax(-1) @ v.double()
    torch.testing.assert_close(out[:, :, 0].double(), unmasked[:, :, 0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[:, :, 2].double(), unmasked[:, :, 2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[:, :, 1].double(), v[:, :, 2].double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse[:, :, 1].double(), scores[:, :, 1, 2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", [*CPU_KERNEL_BACKENDS, "torch"])  # torch: the reference's own rule
def test_threshold_edge_logit_is_visible(backend):
    """A logit equal to the threshold logit is visible; one float32 step below it is blocked."""
    threshold_logit = threshold_to_logit(0.3)
    below = torch.nextafter(torch.tensor(threshold_logit), torch.tensor(-math.inf)).item()
    q, k, v, grad_out = make_inputs(1, 1, 2, 4, 16, torch.float32)
    logits = torch.full((1, 2, 4), -5.0)
    logits[0, 0, 1] = threshold_logit  # row 0: key 1 visible, exactly at the threshold
    logits[0, 1, 1] = threshold_logit
    logits[0, 1, 3] = below  # row 1: key 1 visible, key 3 just below
    out, _, _ = run_backend(backend, q, k, v, grad_out, logits, None, threshold_logit, 0.25)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, 1], atol=1e-6, rtol=1e-6)


def check_blocked_key_never_reaches_the_output(backend, dtype, queries, keys, key_value, device="cpu"):
    """Key 0, blocked for every query, gets a score of key_value ("overflow": far above every visible score, so
    that exp(score - max) overflows; "inf"; "nan"). The results must equal attention over keys 1.. alone: the
    kernels drop blocked keys, they do not multiply them by 0. grad_q is compared only for a finite key 0
    (the reference's dq = dS @ k gives 0 * inf = NaN too)."""
    q, k, v, grad_out = make_inputs(1, 2, queries, keys, 16, dtype, device)
    q[..., 0] = q[..., 0].abs() + 1
    k[:, :, 0] = {"overflow": 1e4 if dtype == torch.float64 else 1e3, "inf": math.inf, "nan": math.nan}[
        key_value
    ]
    logits = torch.ones(1, queries, keys, dtype=dtype, device=device)
    logits[:, :, 0] = -1.0
    out, _, (grad_q, grad_k, grad_v) = run_backend(backend, q, k, v, grad_out, logits, None, 0.0, 1.0)
    ref_out, _, (ref_q, ref_k, ref_v) = reference_results(
        q, k[:, :, 1:], v[:, :, 1:], grad_out, logits[:, :, 1:], None, 0.5, 1.0
    )
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_v[:, :, 1:].double(), ref_v, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_k[:, :, 1:].double(), ref_k, atol=atol, rtol=rtol)
    assert (grad_v[:, :, 0] == 0).all() and (grad_k[:, :, 0] == 0).all()
    if key_value == "overflow":
        torch.testing.assert_close(grad_q.double(), ref_q, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("key_value", ["overflow", "inf", "nan"])
@pytest.mark.parametrize("queries, keys", [(2, 7), (3, 300)])
def test_blocked_key_never_reaches_the_output(backend, dtype, key_value, queries, keys):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take 16- and 32-bit floats")
    check_blocked_key_never_reaches_the_output(backend, dtype, queries, keys, key_value)


def check_huge_scores_keep_the_top_key(backend, device="cpu"):
    """Scaled scores around 1e11, past 2^31: each row's top key takes all of the softmax, as in the float64
    reference. A kernel that fuses score * scale - max (or - lse) into one FMA leaves the product's rounding
    error (thousands) where 0 belongs, and exp's clamping turns a row into a flat average (the scale 0.3
    rounds; a power of two would not). The exact gradients of q and k are 0; in float32 they are rounding
    noise times scale * k (about 1e-7 of it), where a probability of e^88 makes them huge or infinite."""
    generator = torch.Generator().manual_seed(5)
    q, k, v, grad_out = (
        torch.randn(shape, generator=generator).to(device)
        for shape in [(1, 2, 5, 16), (1, 2, 40, 16), (1, 2, 40, 16), (1, 2, 5, 16)]
    )
    k = k * 1e11
    logits = torch.ones(1, 5, 40, device=device)
    logits[:, 1, ::2] = -1.0  # row 1 sees every other key
    scale = 0.3
    out, lse, (grad_q, grad_k, grad_v) = run_backend(backend, q, k, v, grad_out, logits, None, 0.0, scale)
    ref_out, ref_lse, (_, _, ref_grad_v) = reference_results(q, k, v, grad_out, logits, None, 0.5, scale)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, atol=0, rtol=1e-6)
    torch.testing.assert_close(grad_v.double(), ref_grad_v, atol=1e-6, rtol=1e-6)
    size = grad_out.abs().max() * v.abs().max()
    assert grad_q.abs().max() <= 1e-5 * size * scale * k.abs().max()  # False for NaN too
    assert grad_k.abs().max() <= 1e-5 * size * q.abs().max()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_cpu_kernel_huge_scores_keep_the_top_key(monkeypatch, isa):
    if not HAS_CPU_KERNEL:
        pytest.skip("C++ CPU kernel not built")
    monkeypatch.setenv("M2F_KERNELS_CPU_ISA", isa)
    check_huge_scores_keep_the_top_key("cpu")


@needs_triton
def test_triton_huge_scores_keep_the_top_key():
    check_huge_scores_keep_the_top_key("triton")


@needs_cpu_kernel
def test_cpu_kernel_gradcheck_float64():
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 9, 16, dtype=torch.float64, requires_grad=True)
    logits = make_mask_logits(1, 5, 9, 0.0, torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: m2f_kernels.masked_attention(q, k, v, mask_logits=logits, backend="cpu"),
        (q, k, v),
        atol=1e-6,
    )


def backward_twice_is_bitwise_identical(backend, device):
    q, k, v, grad_out = make_inputs(2, 2, 100, 300, 32, torch.float32, device)
    threshold_logit = threshold_to_logit(0.5)
    logits = make_mask_logits(2, 100, 300, threshold_logit, torch.float32, device)
    forward = KERNELS.get(backend, q.device, "forward")
    backward = KERNELS.get(backend, q.device, "backward")
    out, lse = forward(q, k, v, logits, None, threshold_logit, 32**-0.5)
    first = backward(grad_out, q, k, v, out, lse, logits, None, threshold_logit, 32**-0.5, True)
    second = backward(grad_out, q, k, v, out, lse, logits, None, threshold_logit, 32**-0.5, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_KERNEL_BACKENDS)
def test_deterministic_backward_is_bitwise_reproducible(backend):
    backward_twice_is_bitwise_identical(backend, "cpu")


@needs_cpu_kernel
def test_cpu_kernel_does_not_depend_on_thread_count():
    # 1100 keys: several key chunks, the last one partial.
    q, k, v, grad_out = make_inputs(2, 2, 20, 1100, 32, torch.float32)
    logits = make_mask_logits(2, 20, 1100, 0.0, torch.float32)
    threads = torch.get_num_threads()
    results = []
    for count in (1, 2):
        torch.set_num_threads(count)
        try:
            results.append(run_backend("cpu", q, k, v, grad_out, logits, None, 0.0, 0.2))
        finally:
            torch.set_num_threads(threads)
    (out1, lse1, grads1), (out2, lse2, grads2) = results
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)


@needs_cpu_kernel
def test_cpu_kernel_rejects_two_masks():
    q, k, v, _ = make_inputs(1, 1, 2, 3, 16, torch.float32)
    with pytest.raises(RuntimeError, match="exactly one of mask_logits and attn_mask"):
        torch.ops.m2f_kernels._masked_attention_forward(q, k, v, None, None, 0.0, 1.0)


# ---- CUDA (run on a GPU machine) ----

CUDA_SHAPES = [*CPU_SHAPES, (2, 8, 100, 16384, 32), (8, 8, 200, 4096, 32)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_backends_match_reference(backend, dtype, shape):
    check_backend(backend, dtype, shape, "logits", device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_backends_huge_scores_keep_the_top_key(backend):
    check_huge_scores_keep_the_top_key(backend, device="cuda")


def tuned_configs():
    from m2f_kernels.triton import masked_attention as module

    return module.TUNED_CONFIGS if "triton" in m2f_kernels.available_backends() else []


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "config",
    tuned_configs(),
    ids=lambda c: f"Q{c.kwargs['BLOCK_Q']}-K{c.kwargs['BLOCK_K']}-warps{c.num_warps}-stages{c.num_stages}",
)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_kernel"])
def test_cuda_triton_every_autotuned_config_matches_reference(dtype, config, deterministic):
    """Each config the autotuner may pick (block sizes, warps, stages), pinned, on the GPU's compiler and
    tensor cores: 100 queries, 1030 keys in two splits; dq added with atomics or from its own kernel."""
    check_backend(
        "triton",
        dtype,
        (2, 8, 100, 1030, 32),
        "logits",
        device="cuda",
        deterministic=deterministic,
        num_splits=2,
        config=config,
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_autotuned_launches_match_reference(monkeypatch, dtype):
    """The launches of a training run: every kernel timed over its tuned configs on the GPU (even where the
    tests pin them, M2F_KERNELS_TRITON_AUTOTUNE=0), the winners compared with the reference."""
    from m2f_kernels.triton import masked_attention as module

    monkeypatch.setattr(module, "autotuning", lambda: True)
    for name in ATTENTION_KERNELS:
        monkeypatch.setattr(getattr(module, name), "cache", {})
    check_backend("triton", dtype, (2, 8, 100, 1030, 32), "logits", device="cuda")
    assert all(len(getattr(module, name).cache) == 1 for name in ATTENTION_KERNELS)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mask_kind", ["bool", "bool_per_head"])
@pytest.mark.parametrize("shape", [(2, 8, 100, 1024, 32), (1, 3, 7, 4097, 64)])
def test_cuda_backends_bool_masks_match_reference(backend, mask_kind, shape):
    check_backend(backend, torch.float32, shape, mask_kind, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("key_value", ["overflow", "inf", "nan"])
def test_blocked_key_never_reaches_the_output_cuda(backend, key_value):
    check_blocked_key_never_reaches_the_output(backend, torch.float32, 3, 300, key_value, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_deterministic_backward_is_bitwise_reproducible_cuda(backend):
    backward_twice_is_bitwise_identical(backend, "cuda")


def window_mask_logits(batch, queries, keys, threshold_logit, dtype):
    """Mask logits where each query sees one window of keys, as a Mask2Former mask of one object does: whole
    key blocks are blocked for groups of neighbouring queries; other queries see one key of the last block or
    none at all (the fully-blocked-row rule)."""
    logits = torch.full((batch, queries, keys), threshold_logit - 2.0, dtype=torch.float64)
    for i in range(queries):
        if i < 16:
            start, width = 3 * i, 150
        elif i < 24:
            start, width = 600 + i, 40
        elif i < 30:
            start, width = keys - 1, 1
        else:
            continue
        logits[:, i, start : start + width] = (
            threshold_logit + 1.0 + torch.rand(batch, min(width, keys - start))
        )
    return logits.to(dtype)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_kind", ["logits", "bool_per_head"])
def test_cpu_kernel_with_window_masks(dtype, mask_kind):
    batch, heads, queries, keys, head_dim = 2, 3, 37, 1030, 32
    q, k, v, grad_out = make_inputs(batch, heads, queries, keys, head_dim, dtype)
    threshold = mask_threshold(dtype)
    threshold_logit = threshold_to_logit(threshold)
    mask_logits = window_mask_logits(batch, queries, keys, threshold_logit, dtype)
    attn_mask = None
    if mask_kind == "bool_per_head":
        blocked = ~(mask_logits.double() >= threshold_logit)
        attn_mask = torch.stack([blocked, blocked.roll(200, dims=-1), blocked.flip(1)], dim=1)
        mask_logits = None
    scale = head_dim**-0.5
    out, lse, grads = run_backend("cpu", q, k, v, grad_out, mask_logits, attn_mask, threshold_logit, scale)
    ref_out, ref_lse, ref_grads = reference_results(
        q, k, v, grad_out, mask_logits, attn_mask, threshold, scale
    )
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOLERANCE[dtype], rtol=LSE_TOLERANCE[dtype])
    for name, grad, ref_grad in zip(("grad_q", "grad_k", "grad_v"), grads, ref_grads):
        torch.testing.assert_close(
            grad.double(), ref_grad, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )


@needs_triton
@pytest.mark.parametrize("mask_kind", ["logits", "bool_per_head"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_kernel"])
def test_triton_many_heads_query_blocks_and_splits(mask_kind, deterministic):
    """Two images x three heads, two query blocks, three key splits and three key blocks: the kernels' grid
    folds (block, batch * heads) into its first axis, and each program must recover both."""
    shape = (2, 3, 40, 150, 32)
    check_backend("triton", torch.float32, shape, mask_kind, deterministic=deterministic, num_splits=3)


def tuned_block_sizes():
    from m2f_kernels.triton.masked_attention import TUNED_BLOCKS

    return sorted({(block_q, block_k) for block_q, block_k, *_ in TUNED_BLOCKS})


@needs_triton
@pytest.mark.parametrize("block_q, block_k", tuned_block_sizes() if HAS_TRITON_ON_CPU else [])
@pytest.mark.parametrize("mask_kind", ["logits", "bool_per_head"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_kernel"])
def test_triton_every_autotuned_block_size_matches_reference(
    monkeypatch, block_q, block_k, mask_kind, deterministic
):
    """The block sizes the GPU autotuner may pick, pinned: 70 queries (a partial query block of every size),
    600 keys in two splits (partial last split and key block); with mask logits, a row whose only visible key
    is key 300, in the mask pass's second key program. Every attention launch runs the given config."""
    import triton

    from m2f_kernels.triton import masked_attention as module

    launched = []
    run = module._run
    monkeypatch.setattr(
        module,
        "_run",
        lambda kernel, grid, args, config, **constexprs: (
            launched.append(config),
            run(kernel, grid, args, config, **constexprs),
        ),
    )
    config = triton.Config({"BLOCK_Q": block_q, "BLOCK_K": block_k}, num_warps=4)
    shape = (2, 2, 70, 600, 32)
    check_backend(
        "triton", torch.float32, shape, mask_kind, deterministic=deterministic, num_splits=2, config=config
    )
    assert launched == [config] * (3 if deterministic else 2)  # forward, [dq,] dk/dv


@needs_triton
@pytest.mark.parametrize("mask_kind", ["logits", "bool_per_head"])
def test_triton_autotuned_launches_match_reference(monkeypatch, mask_kind):
    """The launches a GPU makes: each kernel's autotuner times every tuned config (here with made-up times, so
    that the forward and the dk/dv/dq kernels each keep a different one, none of them the fixed config) and
    runs the winner, with key splits of whole 128-key blocks. Every timed launch adds to dq: the winner's must
    start from zero again."""
    from m2f_kernels.triton import masked_attention as module

    monkeypatch.setattr(module, "autotuning", lambda: True)
    winners = {"_forward_kernel": 4, "_backward_dkdv_kernel": 5}
    for name, winner in winners.items():
        kernel = getattr(module, name)
        order = iter(range(len(module.TUNED_CONFIGS)))

        def fake_bench(kernel_call, quantiles, order=order, winner=winner):
            kernel_call()
            time = 1.0 if next(order) == winner else 2.0
            return [time] * len(quantiles)

        monkeypatch.setattr(kernel, "cache", {})
        monkeypatch.setitem(kernel.__dict__, "do_bench", fake_bench)  # a cached property of the autotuner
    check_backend("triton", torch.float32, (1, 2, 40, 300, 32), mask_kind, num_splits=2)
    for name, winner in winners.items():
        assert list(getattr(module, name).cache.values()) == [module.TUNED_CONFIGS[winner]], name


@needs_triton
@pytest.mark.parametrize("mask_kind", ["logits", "bool"])
@pytest.mark.parametrize("num_keys", [1, 255, 256, 257, 1300])
@pytest.mark.parametrize("max_key_programs", [65535, 2])
def test_triton_row_flags_find_a_visible_key_anywhere(monkeypatch, mask_kind, num_keys, max_key_programs):
    """The mask pass's flags against torch's any(): one visible key per row at positions spread over every
    key block, fully blocked and NaN rows; with the key programs capped at 2, each program walks several
    key blocks."""
    from m2f_kernels.triton import masked_attention as module

    monkeypatch.setattr(module, "_MAX_GRID_Y", max_key_programs)
    rows, threshold_logit = 37, 0.25
    logits = torch.full((rows, num_keys), threshold_logit - 1.0)
    for row in range(0, rows, 2):
        logits[row, (row * 97) % num_keys] = threshold_logit  # visible: exactly at the threshold
    logits[3, : num_keys // 2] = math.nan
    logits[3, -1] = threshold_logit + 1.0
    logits[5] = math.nan
    visible = logits >= threshold_logit
    if mask_kind == "logits":
        mask, kind = logits, module._MASK_LOGITS
    else:
        mask, kind = (~visible).view(torch.uint8), module._MASK_BOOL
    flags = module._row_flags(mask.contiguous(), kind, num_keys, threshold_logit)
    assert flags.dtype == torch.int8
    assert torch.equal(flags.bool(), visible.any(-1))
    assert flags[1] == 0 and flags[3] == 1 and flags[5] == 0


@needs_triton
def test_triton_launch_config_is_pinned_when_deterministic(monkeypatch):
    """On a GPU the block sizes, warps and stages are autotuned and a key split is a multiple of the largest
    key block; deterministic launches use the head dim's fixed config, as every launch does without
    autotuning (the interpreter). The forward reads torch's deterministic setting, the backward its argument."""
    from m2f_kernels.triton import masked_attention as module

    largest_block_k = max(block_k for _, block_k in tuned_block_sizes())
    assert module._launch_configs(32, None, False)[0] is not None  # the interpreter never autotunes
    monkeypatch.setattr(module, "autotuning", lambda: True)
    assert module._launch_configs(32, None, False) == (None, largest_block_k)
    for head_dim, block_k in [(16, 64), (32, 64), (33, 32), (64, 32)]:
        config, alignment = module._launch_configs(head_dim, None, True)
        assert config.kwargs == {"BLOCK_Q": 32, "BLOCK_K": block_k} and alignment == block_k

    pinned = []
    monkeypatch.setattr(
        module, "_run", lambda kernel, grid, args, config, **constexprs: pinned.append(config)
    )
    q = torch.randn(1, 1, 3, 32)
    logits = torch.randn(1, 3, 5)
    kv = torch.randn(1, 1, 5, 32)
    out, lse = torch.zeros_like(q), torch.zeros(1, 1, 3)
    previous = torch.are_deterministic_algorithms_enabled()
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            module.masked_attention_forward(q, kv, kv, logits, None, 0.0, 1.0)
        finally:
            torch.use_deterministic_algorithms(previous)
        module.masked_attention_backward(q, q, kv, kv, out, lse, logits, None, 0.0, 1.0, deterministic)
    # forward and dk/dv/dq autotuned; then forward, dq and dk/dv pinned
    assert [config is not None for config in pinned] == [False, False, True, True, True]


@needs_triton
def test_triton_key_splits_on_a_gpu(monkeypatch):
    """The GPU rule: about four programs per SM (counting 32-query blocks), no more splits than groups of four
    fixed key blocks, each split a multiple of the alignment, and the splits cover the keys exactly."""
    from m2f_kernels.triton import masked_attention as module

    monkeypatch.setattr(module, "multiprocessor_count", lambda device: 132)
    cuda = torch.device("cuda")
    # B=2, Q=100: 4 query blocks x 16 heads = 64 programs want ceil(528 / 64) = 9 splits; 1024 keys allow 4.
    assert module._key_splits(cuda, 1024, 32, 64, 128, None) == (4, 256)
    # B=8, Q=200: 448 programs want 2 splits.
    assert module._key_splits(cuda, 1024, 32, 448, 128, None) == (2, 512)
    assert module._key_splits(cuda, 1024, 32, 448, 128, 5) == (4, 256)  # 5 wanted, 128-aligned: 4
    for num_keys, programs, alignment in [(1, 1, 128), (4097, 10, 128), (16384, 2, 64), (300, 1, 32)]:
        splits, per_split = module._key_splits(cuda, num_keys, 32, programs, alignment, None)
        assert per_split % alignment == 0 and (splits - 1) * per_split < num_keys <= splits * per_split
        assert splits <= max(1, -(-num_keys // 256))  # four 64-key blocks per split at least, as wanted
    assert module._key_splits(torch.device("cpu"), 4097, 32, 1, 128, None) == (1, 4224)
    # a wanted count beyond the grid's 65,535 on axis 1 is capped: 2^26 keys in 32-key splits would be 2^21
    splits, per_split = module._key_splits(cuda, 2**26, 32, 1, 32, 2**21)
    assert splits <= 65535 and per_split % 32 == 0 and (splits - 1) * per_split < 2**26 <= splits * per_split


@pytest.mark.cuda
def test_auto_backend_follows_the_work_threshold(monkeypatch):
    """On a GPU, "auto" runs Triton from TRITON_FROM_WORK = B * Q * K on, the default order below it, the
    PyTorch backend for float64, and M2F_KERNELS_BACKEND overrides the rule."""
    from m2f_kernels.ops.masked_attention import TRITON_FROM_WORK, _auto_backend

    monkeypatch.delenv("M2F_KERNELS_BACKEND", raising=False)
    q = torch.empty(2, 8, 100, 32, device="cuda")
    keys_at_threshold = -(-TRITON_FROM_WORK // 200)
    k_small = torch.empty(2, 8, keys_at_threshold - 1, 32, device="cuda")
    k_large = torch.empty(2, 8, keys_at_threshold, 32, device="cuda")
    assert _auto_backend(q, k_small, "auto") == "auto"
    assert _auto_backend(q, k_large, "auto") == "triton"
    assert _auto_backend(q, k_large, "cuda") == "cuda"
    assert _auto_backend(q.double(), k_large.double(), "auto") == "torch"
    monkeypatch.setenv("M2F_KERNELS_BACKEND", "cuda")
    assert _auto_backend(q, k_large, "auto") == "auto"  # resolved to the variable's backend by the op
