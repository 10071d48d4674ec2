"""Learned protocols (CommNet, TarMAC, IC3Net gate): the channel's mask decides what a receiver
can be influenced by, messages are quantised as the channel quantises, bytes are accounted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comms.channel import quantise as channel_quantise
from comms.protocols.commnet import CommNet
from comms.protocols.ic3net import IC3NetGate
from comms.protocols.tarmac import TarMAC
from marl.core.protocol import make_quantiser, straight_through

H, N = 8, 4
PROTOCOLS = [CommNet, TarMAC, IC3NetGate]


def _run(module, h, mask):
    gate = torch.ones(h.shape[:-1], dtype=torch.long) if isinstance(module, IC3NetGate) else None
    return module(h, mask, gate=gate).h


@pytest.mark.parametrize("cls", PROTOCOLS)
def test_dropped_message_has_no_influence(cls):
    torch.manual_seed(0)
    module = cls(hidden_size=H, rounds=1)
    h = torch.randn(2, N, H, requires_grad=True)
    mask = torch.ones(2, N, N, dtype=torch.bool)
    mask[:, 0, 1] = False  # agent 1's message to agent 0 is lost (both batch entries)
    out = _run(module, h, mask)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), h)
    assert torch.all(grad[:, 1] == 0), "receiver 0 depends on a message that was dropped"
    assert grad[:, 2].abs().sum() > 0, "receiver 0 must depend on a delivered message"
    # Changing the dropped sender's state leaves the receiver's output unchanged, to the bit.
    h2 = h.detach().clone()
    h2[:, 1] += 5.0
    out2 = _run(module, h2, mask)
    assert torch.equal(out[:, 0].detach(), out2[:, 0])
    assert not torch.equal(out[:, 2].detach(), out2[:, 2])  # agent 2 did hear agent 1


@pytest.mark.parametrize("cls", PROTOCOLS)
def test_sender_cut_off_in_multi_round(cls):
    torch.manual_seed(1)
    module = cls(hidden_size=H, rounds=2)
    h = torch.randn(N, H, requires_grad=True)
    mask = torch.ones(N, N, dtype=torch.bool)
    mask[:, 3] = False  # everything agent 3 sends is lost: no relaying through round 2 either
    out = _run(module, h, mask)
    (grad,) = torch.autograd.grad(out[:3].sum(), h)
    assert torch.all(grad[3] == 0)
    (grad_all,) = torch.autograd.grad(_run(module, h, torch.ones(N, N, dtype=torch.bool))[:3].sum(), h)
    assert grad_all[3].abs().sum() > 0


def test_gate_bytes_and_silence():
    torch.manual_seed(2)
    module = IC3NetGate(hidden_size=H, rounds=2, bytes_per_value=1.0)
    h = torch.randn(N, H)
    mask = torch.ones(N, N, dtype=torch.bool)
    gate = torch.tensor([1, 0, 1, 0])
    out = module(h, mask, gate=gate)
    assert out.bytes_sent.tolist() == [2 * H, 0.0, 2 * H, 0.0]  # only speakers pay
    assert out.logprob.shape == (N,) and out.entropy.shape == (N,)
    # A silent agent's state cannot reach anyone.
    h2 = h.clone()
    h2[1] += 3.0
    out2 = module(h2, mask, gate=gate)
    assert torch.equal(out.h[[0, 2, 3]], out2.h[[0, 2, 3]])
    # Sampled gates are 0/1 and the byte count follows them.
    sampled = module(h, mask)
    assert torch.equal(sampled.bytes_sent, sampled.gate.float() * 2 * H)


@pytest.mark.parametrize("cls", [CommNet, TarMAC])
def test_bytes_per_step(cls):
    module = cls(hidden_size=H, rounds=3, bytes_per_value=0.5)
    out = module(torch.zeros(5, N, H), None)
    size = H if cls is CommNet else module.key_size + module.value_size
    assert torch.all(out.bytes_sent == 3 * size * 0.5) and out.bytes_sent.shape == (5, N)


@pytest.mark.parametrize("bits", [1, 8, 16])
def test_quantiser_matches_channel_and_passes_gradients(bits):
    x = torch.randn(6, 12, dtype=torch.float64)
    q = make_quantiser(bits)
    np.testing.assert_allclose(q(x).numpy(), channel_quantise(x.numpy(), bits), rtol=0, atol=1e-9)
    x.requires_grad_(True)
    y = straight_through(q, x)
    assert not torch.equal(y.detach(), x.detach())
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.all(g == 1)
    assert make_quantiser(32) is None
