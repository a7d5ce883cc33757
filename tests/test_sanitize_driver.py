"""benchmarks/sanitize.py, the driver that compute-sanitizer runs on GPU machines, checked on the CPU kernels."""

import pytest
import torch

from benchmarks import sanitize
from m2f_kernels import _backend


def test_every_case_matches_on_the_cpu_kernels():
    if not _backend.has_kernel("_masked_attention_forward", "cpu"):
        pytest.skip("the C++ CPU kernels are not built")
    assert sanitize.main(["--backend", "cpu"]) == 0


def test_compare_flags_errors_and_misplaced_nans(capsys):
    expected = torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float64)
    assert sanitize._compare("same", [expected.float()], [expected], torch.float32)
    assert not sanitize._compare("off", [torch.tensor([1.0, float("nan"), 3.01])], [expected], torch.float32)
    assert not sanitize._compare("nan", [torch.tensor([1.0, 2.0, 3.0])], [expected], torch.float32)
    output = capsys.readouterr().out
    assert "MISMATCH off" in output and "NaN in different places" in output


def test_an_empty_op_list_is_refused():
    """`--ops` with no name ran no case and passed, so compute-sanitizer 'passed' without a kernel."""
    with pytest.raises(SystemExit):
        sanitize.main(["--backend", "cpu", "--ops"])
