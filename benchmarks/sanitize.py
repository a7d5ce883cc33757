"""Runs every CUDA kernel forward and backward on small inputs with the edge cases, for compute-sanitizer.

``compute-sanitizer --tool memcheck python -m benchmarks.sanitize`` (also racecheck, synccheck, initcheck;
benchmarks/gpu_check.sh runs all four). Each case also compares with the float64 reference, so a run that the
sanitizer passes but that computes garbage still fails; the process exits with status 1 if any case differs.
``--backend cpu`` runs the same cases on the C++ CPU kernels (a check of this script without a GPU).
Cases: samples outside the image, on borders and NaN; K not a multiple of the key tile, Q = 1, fully blocked
rows, per-head bool masks; the deterministic and the atomic backward; every GPU dtype.
"""

from __future__ import annotations

import argparse
import sys

import torch

import m2f_kernels
from m2f_kernels import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _levels(shapes, device):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cumsum(sizes, 0) - sizes


def _with_edge_locations(locations: torch.Tensor) -> torch.Tensor:
    """Spreads locations over [-0.25, 1.25] and plants a NaN, an exact border and an exact corner."""
    locations = locations * 1.5 - 0.25
    flat = locations.view(-1, 2)
    flat[0] = float("nan")
    flat[1] = torch.tensor([0.0, 1.0])
    if flat.shape[0] > 2:
        flat[2] = torch.tensor([1.0, 0.0])
    return locations


def _inputs_require_grad(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(output: torch.Tensor, inputs, seed: int, dtype: torch.dtype):
    """Gradients of sum(output * g) for a random g drawn in float64 and rounded to `dtype`, the dtype the op
    ran in, so our output and the float64 reference's get the same g."""
    generator = torch.Generator(device=output.device).manual_seed(seed)
    grad_output = torch.randn(output.shape, generator=generator, device=output.device, dtype=torch.float64)
    return torch.autograd.grad(output, inputs, grad_output.to(dtype).to(output.dtype))


def _compare(name: str, ours, expected, dtype: torch.dtype) -> bool:
    tolerance = TOLERANCE[dtype]
    ok = True
    for index, (a, b) in enumerate(zip(ours, expected)):
        if not torch.equal(a.isnan(), b.isnan()):
            print(f"MISMATCH {name} tensor {index}: NaN in different places")
            ok = False
            continue
        a64, b64 = a.double().nan_to_num(), b.double().nan_to_num()
        scale = b64.abs().max().item() if b64.numel() else 0.0
        error = (a64 - b64).abs().max().item() if b64.numel() else 0.0
        if error > tolerance * max(1.0, scale):
            print(f"MISMATCH {name} tensor {index}: max error {error:.3g} (scale {scale:.3g})")
            ok = False
    return ok


def ms_deform_attn_cases(device, backend):
    shapes = [(8, 6), (5, 7), (1, 1)]
    spatial_shapes, level_start_index = _levels(shapes, device)
    num_pixels = sum(h * w for h, w in shapes)
    for dtype in (*DTYPES, torch.float64):
        for heads, channels in ((8, 32), (4, 16), (1, 64), (2, 3)):
            value = torch.randn(2, num_pixels, heads, channels, device=device, dtype=dtype)
            locations = _with_edge_locations(torch.rand(2, 9, heads, 3, 4, 2, device=device, dtype=dtype))
            weights = torch.rand(2, 9, heads, 3, 4, device=device, dtype=dtype)
            inputs = _inputs_require_grad(value, locations, weights)
            out = m2f_kernels.ms_deform_attn(
                inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2], backend=backend
            )
            ours = [out, *_grads(out, inputs, 0, dtype)]
            ref_inputs = _inputs_require_grad(value.double(), locations.double(), weights.double())
            ref = reference.ms_deform_attn(ref_inputs[0], spatial_shapes, level_start_index, *ref_inputs[1:])
            expected = [ref, *_grads(ref, ref_inputs, 0, dtype)]
            yield f"ms_deform_attn {dtype} M={heads} D={channels}", ours, expected, dtype


def _off_cell_edges(reference_points, offsets, spatial_shapes):
    """Moves each offset whose pixel coordinate (reference * size + offset - 0.5) lies within 0.05 pixel of
    an integer, where bilinear sampling's gradient jumps, by a quarter pixel. Coarse 16-bit inputs often
    land exactly there, and the kernels' float32 location and the reference's float64 one then fall on either
    side (offset / size is inexact), giving gradients that differ by the jump."""
    size = spatial_shapes.flip(-1).double()  # (L, 2) as (W, H)
    pixel = reference_points.double()[:, :, None, :, None, :] * size[:, None, :] + offsets.double() - 0.5
    near_edge = (pixel - pixel.round()).abs() < 0.05
    return torch.where(near_edge, offsets + 0.25, offsets)


def ms_deform_attn_fused_cases(device, backend):
    shapes = [(8, 6), (5, 7), (1, 1)]
    spatial_shapes, level_start_index = _levels(shapes, device)
    num_pixels = sum(h * w for h, w in shapes)
    for dtype in (*DTYPES, torch.float64):
        value = torch.randn(2, num_pixels, 8, 32, device=device, dtype=dtype)
        reference_points = torch.rand(2, 9, 3, 2, device=device, dtype=dtype)
        offsets = torch.randn(2, 9, 8, 3, 4, 2, device=device, dtype=dtype) * 3
        offsets = _off_cell_edges(reference_points, offsets, spatial_shapes)
        logits = torch.randn(2, 9, 8, 12, device=device, dtype=dtype)
        inputs = _inputs_require_grad(value, reference_points, offsets, logits)
        out = m2f_kernels.ms_deform_attn_fused(
            inputs[0], spatial_shapes, level_start_index, *inputs[1:], backend=backend
        )
        ours = [out, *_grads(out, inputs, 1, dtype)]
        ref_inputs = _inputs_require_grad(*(t.double() for t in (value, reference_points, offsets, logits)))
        ref = reference.ms_deform_attn_fused(
            ref_inputs[0], spatial_shapes, level_start_index, *ref_inputs[1:]
        )
        expected = [ref, *_grads(ref, ref_inputs, 1, dtype)]
        yield f"ms_deform_attn_fused {dtype}", ours, expected, dtype


def masked_attention_cases(device, backend):
    for dtype in DTYPES:
        for queries, keys, head_dim in ((1, 1, 16), (7, 333, 32), (100, 1030, 32), (3, 65, 64)):
            q = torch.randn(2, 8, queries, head_dim, device=device, dtype=dtype)
            k = torch.randn(2, 8, keys, head_dim, device=device, dtype=dtype)
            v = torch.randn(2, 8, keys, head_dim, device=device, dtype=dtype)
            mask_logits = torch.randn(2, queries, keys, device=device, dtype=dtype) * 3
            mask_logits[:, 0] = -10.0  # a fully blocked row attends to every key
            per_head_mask = torch.rand(2 * 8, queries, keys, device=device) < 0.7
            for mask_name, mask in (
                ("logits", {"mask_logits": mask_logits}),
                ("bool", {"attn_mask": per_head_mask}),
            ):
                inputs = _inputs_require_grad(q, k, v)
                out = m2f_kernels.masked_attention(*inputs, **mask, backend=backend)
                ours = [out, *_grads(out, inputs, 2, dtype)]
                ref_inputs = _inputs_require_grad(q.double(), k.double(), v.double())
                ref_mask = {key: m.double() if m.is_floating_point() else m for key, m in mask.items()}
                ref, _ = reference.masked_attention(*ref_inputs, **ref_mask)
                expected = [ref, *_grads(ref, ref_inputs, 2, dtype)]
                yield (
                    f"masked_attention {dtype} Q={queries} K={keys} d={head_dim} {mask_name}",
                    ours,
                    expected,
                    dtype,
                )


def point_loss_cases(device, backend):
    for dtype in (*DTYPES, torch.float64):
        planes = torch.randn(3, 2, 13, 9, device=device, dtype=dtype)
        coords = _with_edge_locations(torch.rand(3, 101, 2, device=device, dtype=dtype))
        inputs = _inputs_require_grad(planes, coords)
        out = m2f_kernels.point_sample(*inputs, backend=backend)
        ours = [out, *_grads(out, inputs, 3, dtype)]
        ref_inputs = _inputs_require_grad(planes.double(), coords.double())
        ref = reference.point_sample(*ref_inputs)
        yield f"point_sample {dtype}", ours, [ref, *_grads(ref, ref_inputs, 3, dtype)], dtype

        mask_logits = torch.randn(4, 17, 11, device=device, dtype=dtype)
        targets = torch.rand(4, 67, 45, device=device) < 0.4
        # 1,301 points: several point splits of the loss forward.
        coords = _with_edge_locations(torch.rand(4, 1301, 2, device=device, dtype=dtype))
        logits_in = mask_logits.detach().clone().requires_grad_()
        ce, dice = m2f_kernels.point_mask_loss(logits_in, targets, coords, 3.0, backend=backend)
        ours = [ce, dice, *torch.autograd.grad(ce * 0.7 + dice * 1.3, [logits_in])]
        ref_in = mask_logits.double().requires_grad_()
        ref_ce, ref_dice = reference.point_mask_loss(ref_in, targets, coords.double(), 3.0)
        expected = [ref_ce, ref_dice, *torch.autograd.grad(ref_ce * 0.7 + ref_dice * 1.3, [ref_in])]
        yield f"point_mask_loss {dtype}", ours, expected, dtype

        for queries, targets_count in ((100, 50), (1, 0), (37, 5)):
            pred = torch.randn(queries, 1031, device=device, dtype=dtype)
            labels = (torch.rand(targets_count, 1031, device=device) < 0.5).to(dtype)
            ours = list(m2f_kernels.pairwise_mask_cost(pred, labels, backend=backend))
            expected = list(reference.pairwise_mask_cost(pred.double(), labels.double()))
            yield f"pairwise_mask_cost {dtype} Q={queries} T={targets_count}", ours, expected, dtype


CASES = {
    "masked_attention": masked_attention_cases,
    "point_loss": point_loss_cases,
    "ms_deform_attn": ms_deform_attn_cases,
    "ms_deform_attn_fused": ms_deform_attn_fused_cases,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", choices=("cuda", "triton", "cpu"))
    parser.add_argument("--ops", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.backend == "cpu" else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --backend cpu)")
        return 2
    torch.manual_seed(0)
    failures = 0
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        for op in args.ops:
            for name, ours, expected, dtype in CASES[op](device, args.backend):
                label = f"{name} deterministic={deterministic}"
                if _compare(label, ours, expected, dtype):
                    print(f"ok {label}")
                else:
                    failures += 1
    torch.use_deterministic_algorithms(False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"{failures} mismatching cases")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
