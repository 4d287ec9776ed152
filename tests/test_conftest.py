import torch


def test_uninitialized_memory_is_poisoned():
    assert torch.empty(4).isnan().all()
    assert torch.empty_like(torch.zeros(3, dtype=torch.float64)).isnan().all()
    assert torch.zeros(1).new_empty(5).isnan().all()
