import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffuse.footprint import Footprint, Parameters, count_flops, parameter_count, peak_memory, step_footprint

MiB = 2**20
F32 = 4  # bytes per float32 element


def test_parameter_count():
    assert parameter_count(nn.Linear(3, 4)) == Parameters(total=16, trainable=16)
    frozen = nn.Linear(3, 4)
    frozen.bias.requires_grad_(False)
    assert parameter_count(frozen) == Parameters(16, 12)
    tied = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    tied[1].weight = tied[0].weight
    assert parameter_count(tied) == Parameters(9, 9)  # a shared weight counts once


def test_count_flops_matmul_is_two_per_multiply_add():
    m, k, n = 3, 5, 7
    x, w = torch.randn(m, k), torch.randn(k, n)
    assert count_flops(lambda: x @ w) == 2 * m * n * k == 210


def test_count_flops_linear_forward_and_backward():
    B, I, O = 8, 16, 4
    lin = nn.Linear(I, O)
    x = torch.randn(B, I, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * B * I * O == 1024  # the bias add is not counted
    # backward: grad input (B,O)@(O,I) and grad weight (O,B)@(B,I), 2BIO each
    assert count_flops(lambda: lin(x).sum().backward()) == 6 * B * I * O == 3072


def test_peak_memory_of_held_allocations():
    def fn():
        a = torch.empty(MiB // F32)  # 1 MiB
        b = torch.empty(2 * MiB // F32)  # 2 MiB while a is held
        del a, b
        torch.empty(MiB // 2 // F32)  # 0.5 MiB after both are freed

    assert peak_memory(fn, "cpu") == 3 * MiB == 3145728


def test_peak_memory_is_the_max_of_temporaries_not_their_sum():
    def fn():
        for mib in (1, 3, 2):
            torch.empty(mib * MiB // F32)  # freed before the next one is made

    assert peak_memory(fn, "cpu") == 3 * MiB


def test_peak_memory_counts_a_storage_once_and_skips_older_ones():
    old = torch.zeros(MiB // F32)

    def fn():
        old.add_(1)  # in place on a storage made before: nothing new
        old[:10].mul_(2)
        a = torch.empty(MiB // F32)
        views = [a.view(-1, 2), a[1:], a.t()]  # noqa: F841  (views share a's storage)

    assert peak_memory(fn, "cpu") == MiB


def test_peak_memory_sees_tensors_autograd_saves_and_their_release():
    n, m = MiB // F32, MiB // 2 // F32
    leaf = torch.randn(n, requires_grad=True)

    def fn():
        y = leaf.exp()
        z = y.exp()
        del y  # still saved by z's graph (exp's backward uses its result)
        torch.empty(m)  # peak here: y + z + 0.5 MiB = 2.5 MiB
        del z  # the graph goes, and y with it
        torch.empty(2 * n + m // 2)  # 2.25 MiB: more than the peak only if the frees were missed
    assert peak_memory(fn, "cpu") == (2 * n + m) * F32 == 5 * MiB // 2


def _blocks(n=4, width=32):
    torch.manual_seed(0)
    return nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
                         for _ in range(n))


def test_checkpointing_lowers_the_peak_and_keeps_the_gradients():
    B, W, N = 256, 32, 4
    blocks = _blocks(N, W)
    x = torch.randn(B, W)

    def step(ckpt):
        h = x
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=False) if ckpt else block(h)
        h.square().sum().backward()

    grads, peaks, flops = {}, {}, {}
    for ckpt in (False, True):
        blocks.zero_grad(set_to_none=True)
        peaks[ckpt] = peak_memory(lambda: step(ckpt), "cpu")
        grads[ckpt] = [p.grad.clone() for p in blocks.parameters()]
        flops[ckpt] = count_flops(lambda: step(ckpt))
    assert peaks[False] - peaks[True] > 2 * B * W * F32  # a block keeps its input, not its two ReLU outputs
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))
    bww = B * W * W
    # 8 Linears, 2BWW each for forward, grad input, grad weight; the first has no grad input
    assert flops[False] == (8 * 6 - 2) * bww == 12058624
    assert flops[True] == flops[False] + 8 * 2 * bww == 16252928  # plus one recomputed forward


def test_step_footprint_of_a_linear_sgd_step():
    B, I, O = 8, 16, 4
    torch.manual_seed(0)
    lin = nn.Linear(I, O)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    x = torch.randn(B, I)

    def step():
        opt.zero_grad(set_to_none=True)
        lin(x).sum().backward()
        opt.step()

    fp = step_footprint(step, lin, B, "cpu")
    # x needs no gradient: forward 2BIO + grad weight 2BIO; peak = the gradients (I O + O floats) + loss + its seed
    assert fp == Footprint(parameters=68, flops_per_image=4 * I * O, peak_bytes=(I * O + O) * F32 + 2 * F32,
                           batch_size=B, parameter_bytes=68 * F32)
    assert fp.flops_per_image == 256 and fp.peak_bytes == 280
    text = str(fp)
    assert text.startswith("68 parameters (272 B); 256 FLOP per training image (forward + backward")
    assert "batch 8: 280 B on top of" in text
    big = Footprint(2_410_000, 1.86e9, 812 * MiB, 32, 9_640_000)
    assert str(big).startswith("2.41 M parameters (9.19 MiB); 1.86 GFLOP per training image")
    assert "of batch 32: 812 MiB on top of" in str(big)
    with pytest.raises(ValueError, match="batch_size"):
        step_footprint(step, lin, 0, "cpu")
