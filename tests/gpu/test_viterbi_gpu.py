"""The group-minimum Viterbi engine's CUDA kernels (engine="tir-min") against the torch passes on the GPU."""
import pytest
import torch

from qcompile.formats.trellis import default_tlut, trellis_format
from qcompile.formats.viterbi import is_path, is_tailbiting, path_cost, viterbi, viterbi_tailbiting

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["qtip-3inst-2", "qtip-hyb-2", "qtip-1mad-3", "qtip-hyb-4"])
def test_tir_min_on_cuda_finds_the_torch_engines_paths(name):
    """L=16 with a real code's codebook; 203 sequences (not a whole number of a thread's 8: padded).
    Both engines add fp32 costs in the same elementwise order up to FMA contraction, so paths may part
    only on near-ties: nearly all agree and the path costs match closely."""
    fmt = trellis_format(name)
    cb = fmt.codebook(default_tlut("cuda") if fmt.code == "hyb" else None, "cuda").to(torch.float32)
    gen = torch.Generator().manual_seed(fmt.K * 10 + fmt.V)
    x = (torch.randn(203, fmt.S, fmt.V, generator=gen) * cb.pow(2).mean().sqrt().item()).cuda()
    top = torch.randint(0, 1 << (fmt.L - fmt.KV), (203,), generator=gen).cuda()
    for kwargs in ({}, {"start_top": top, "end_low": top}):
        s_torch, c_torch = viterbi(x, cb, fmt.L, fmt.KV, engine="torch", **kwargs)
        s_min, c_min = viterbi(x, cb, fmt.L, fmt.KV, engine="tir-min", **kwargs)
        assert is_path(s_min, fmt.L, fmt.KV).all()
        assert (s_min == s_torch).all(dim=1).float().mean() >= 0.9
        assert torch.allclose(c_min, c_torch, rtol=1e-5, atol=1e-3)
        assert torch.allclose(path_cost(x, cb, s_min), path_cost(x, cb, s_torch), rtol=1e-4)
    states, _ = viterbi_tailbiting(x, cb, fmt.L, fmt.KV, engine="tir-min")
    assert is_tailbiting(states, fmt.L, fmt.KV).all()


def test_tir_min_on_cuda_in_chunks_equals_one_chunk():
    """A memory budget of a few sequences splits the batch into chunks of other sizes (other compiled
    kernels, other padding): the same paths as one chunk."""
    from qcompile.formats.viterbi import per_sequence_bytes

    fmt = trellis_format("qtip-hyb-2")
    cb = fmt.codebook(default_tlut("cuda"), "cuda").to(torch.float32)
    x = torch.randn(40, fmt.S, fmt.V, generator=torch.Generator().manual_seed(5)).cuda()
    whole, _ = viterbi_tailbiting(x, cb, fmt.L, fmt.KV, engine="tir-min")
    budget = 13 * per_sequence_bytes(fmt.L, fmt.KV, fmt.S, "tir-min")
    chunked, _ = viterbi_tailbiting(x, cb, fmt.L, fmt.KV, engine="tir-min", memory_budget=budget)
    assert torch.equal(whole, chunked)
