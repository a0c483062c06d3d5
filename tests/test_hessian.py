"""Hessian capture (layer at a time, shared inputs) on a tiny random Llama, damping and validation."""
import pytest
import torch
from torch import nn

from qcompile.errors import QCompileError
from qcompile.quant import hessian as hs

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=100,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100, (2, 8), generator=gen),
            torch.randint(0, 100, (7,), generator=gen),  # 1-D: one sequence
            {"input_ids": torch.randint(0, 100, (3, 5), generator=gen)}]


def _as_ids(batch):
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    return ids if ids.dim() == 2 else ids[None]


def _direct_hessians(model, batches):
    """Σ xxᵀ / count (float64) of every linear's input, from plain full-model forwards."""
    rows = {}
    handles = []
    for li, layer in enumerate(model.model.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                key = (li, name)

                def hook(_m, args, key=key):
                    rows.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
                handles.append(mod.register_forward_pre_hook(hook))
    hidden = []
    with torch.no_grad():
        for b in batches:
            hidden.append(model(_as_ids(b), output_hidden_states=True, use_cache=False).hidden_states)
    for h in handles:
        h.remove()
    out = {}
    for key, xs in rows.items():
        X = torch.cat(xs)
        out[key] = X.T @ X / X.shape[0]
    return out, hidden


def test_layer_hessians_equal_direct_xtx_and_share_inputs(tiny_llama, batches):
    direct, hidden = _direct_hessians(tiny_llama, batches)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    captured = list(hs.iter_layer_hessians(tiny_llama, batches, "cpu"))
    assert [c.index for c in captured] == [0, 1]
    tokens = sum(_as_ids(b).numel() for b in batches)
    for c in captured:
        H = c.hessians
        assert H["self_attn.q_proj"] is H["self_attn.k_proj"] is H["self_attn.v_proj"]
        assert H["mlp.up_proj"] is H["mlp.gate_proj"]
        distinct = {id(a) for a in H.values()}
        assert len(distinct) == 4  # qkv, o, up/gate, down
        groups = {names: acc for names, acc in c.groups()}
        assert set(groups) == {("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                               ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)}
        for name, acc in H.items():
            assert acc.count == tokens  # shared accumulators count each token once
            assert acc.sum_xxT.dtype == torch.float64
            assert torch.allclose(acc.hessian(), direct[(c.index, name)], rtol=1e-6, atol=1e-9), name
        # the states that entered layer i are what the full forward produces there
        for b, (inp, full) in enumerate(zip(c.inputs, hidden)):
            assert torch.allclose(inp, full[c.index], atol=1e-5), (c.index, b)
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not tiny_llama.training


def test_capture_single_layer_matches_sequential_pass(tiny_llama, batches):
    direct, _ = _direct_hessians(tiny_llama, batches)
    H1 = hs.capture_layer_hessians(tiny_llama, batches, 1, "cpu", cache_device="cpu")
    assert torch.allclose(H1["mlp.down_proj"].hessian(), direct[(1, "mlp.down_proj")], rtol=1e-6, atol=1e-9)
    assert torch.allclose(H1["self_attn.q_proj"].mean(),
                          H1["self_attn.q_proj"].sum_x / H1["self_attn.q_proj"].count)


def test_capture_errors(tiny_llama, batches):
    with pytest.raises(QCompileError, match="empty"):
        hs.capture_layer_hessians(tiny_llama, [], 0, "cpu")
    with pytest.raises(QCompileError, match="out of range"):
        hs.capture_layer_hessians(tiny_llama, batches, 5, "cpu")
    with pytest.raises(QCompileError, match="token ids"):
        hs.capture_layer_hessians(tiny_llama, [torch.randn(2, 4)], 0, "cpu")
    with pytest.raises(QCompileError, match="decoder layer"):
        hs.capture_layer_hessians(nn.Linear(4, 4), batches, 0, "cpu")


def test_nan_activations_are_reported(tiny_llama, batches):
    emb = tiny_llama.model.embed_tokens.weight
    saved = emb.data.clone()
    try:
        emb.data[:] = float("nan")
        with pytest.raises(QCompileError, match="NaN"):
            hs.capture_layer_hessians(tiny_llama, batches, 0, "cpu")
    finally:
        emb.data.copy_(saved)


def test_accumulator_chunks_and_covariance():
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(50, 6, dtype=torch.float64, generator=gen) + 3.0
    acc = hs.HessianAccumulator(6)
    acc.add(X[:20].float())
    acc.add(X[20:].reshape(5, 6, 6).float())
    assert acc.count == 50
    assert torch.allclose(acc.hessian(), X.T @ X / 50, rtol=1e-6)
    mu = X.mean(0)
    assert torch.allclose(acc.covariance(), (X - mu).T @ (X - mu) / 50, rtol=1e-5, atol=1e-6)
    with pytest.raises(QCompileError, match="last dim 6"):
        acc.add(torch.ones(3, 5))
    with pytest.raises(QCompileError, match="no rows"):
        hs.HessianAccumulator(6).hessian()


def test_damp():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(10, 16, dtype=torch.float64, generator=gen) * 7.0  # rank 10 < 16: singular
    H = X.T @ X / 10
    D = hs.damp(H, sigma=1e-2)
    assert torch.allclose(D, H / torch.diagonal(H).mean() + 1e-2 * torch.eye(16, dtype=torch.float64))
    assert torch.isclose(torch.diagonal(D).mean(), torch.tensor(1.01, dtype=torch.float64))
    assert float(torch.linalg.eigvalsh(D).min()) >= 1e-2 - 1e-9
    assert hs.damp(H.float()).dtype == torch.float32
    assert torch.allclose(hs.damp(H, sigma=0.0), H / torch.diagonal(H).mean())


@pytest.mark.parametrize("bad,match", [
    (torch.ones(3, 4), "square"),
    (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), "symmetric"),
    (torch.tensor([[1.0, 2.0], [2.0, 1.0]]), "positive semidefinite"),
    (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "NaN"),
    (torch.zeros(3, 3), "zero diagonal"),
])
def test_damp_rejects_bad_hessians(bad, match):
    with pytest.raises(QCompileError, match=match):
        hs.damp(bad)
    with pytest.raises(QCompileError):
        hs.damp(torch.eye(3), sigma=-1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_model_calibrated_on_gpu_one_layer_at_a_time(tiny_llama, batches):
    ref = hs.capture_layer_hessians(tiny_llama, batches, 1, "cpu")
    got = hs.capture_layer_hessians(tiny_llama, batches, 1, "cuda", cache_device="cpu")
    assert all(p.device.type == "cpu" for p in tiny_llama.parameters())  # layers moved back
    for name, acc in got.items():
        assert acc.sum_xxT.device.type == "cuda"
        assert torch.allclose(acc.hessian().cpu(), ref[name].hessian(), rtol=1e-4, atol=1e-6), name
