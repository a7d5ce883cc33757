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
