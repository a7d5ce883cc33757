import pytest
import torch


@pytest.fixture
def host_copies(monkeypatch) -> list:
    """The shape of every tensor copied to the host with Tensor.cpu while the test runs."""
    copies = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        copies.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    return copies


@pytest.fixture
def host_reads(monkeypatch) -> list:
    """The name of every Tensor method that reads values to the host (on a GPU each waits for the queued work)
    called while the test runs."""
    reads = []
    for name in ("cpu", "tolist", "item", "numpy", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _real=real, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads
