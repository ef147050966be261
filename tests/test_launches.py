"""fastvae.launches: the traced kernel count (aten ops that launch a kernel; views and allocations not)."""

import torch

from fastvae.launches import trace_kernels


def test_known_op_sequence_counts_each_launching_op_once():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    trace = trace_kernels(lambda: (a @ b).relu().sum())
    assert trace.aten == ["mm", "relu", "sum"] and trace.total == 3 and trace.triton == []
    assert trace.summary().startswith("3 kernels (traced)")


def test_views_and_allocations_are_not_counted():
    x = torch.randn(4, 6)
    trace = trace_kernels(
        lambda: (x.view(24), x.t(), x.unsqueeze(0), x[1:], x.reshape(2, 12), torch.empty(5))
    )
    assert trace.total == 0, trace.aten


def test_in_place_and_copy_ops_are_counted():
    x, y = torch.randn(5), torch.randn(5)
    trace = trace_kernels(lambda: (x.add_(1.0), y.copy_(x), x.view(5, 1).mul(2)))
    assert trace.aten == ["add_", "copy_", "mul"]


def test_backward_and_optimizer_ops_are_traced():
    w = torch.nn.Parameter(torch.randn(3, 3))
    opt = torch.optim.SGD([w], lr=0.1)
    x = torch.randn(2, 3)

    def step():
        opt.zero_grad(set_to_none=True)
        (x @ w).pow(2).sum().backward()
        opt.step()

    trace = trace_kernels(step)
    assert "mm" in trace.aten and trace.aten.count("mm") >= 2  # forward, and the weight gradient
    assert trace.total >= 6, trace.aten
