"""Fused QuIP# linears on the GPU: a toy fused e8p-2 checkpoint built for the local GPU gives the
same logits as its llvm build's reference (the dequantized model), and a decoder layer with fused
qkv / upgate replays correctly from a CUDA graph."""
import pytest
import torch

import qcompile as qc
from test_e8p_io import CONFIG
from test_fused_runtime import build_fused_artifact, reference_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_fused(tmp_path_factory):
    return build_fused_artifact(tmp_path_factory.mktemp("fused-gpu"), "auto")


def test_logits_match_the_dequantized_reference(gpu_fused):
    art, quantized, unq = gpu_fused
    model = qc.load(art, device="cuda")
    ref = reference_model(quantized, unq)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids.cuda()).logits.float().cpu()
        want = ref(ids).logits
    err = ((got - want).norm() / want.norm()).item()
    assert err < 2e-2, err  # the same bound as the llvm test (fp16 products over two toy layers)


def test_fused_mlp_replays_from_a_cuda_graph(gpu_fused, check_graph_replay):
    art, _, _ = gpu_fused
    model = qc.load(art, device="cuda")
    mlp = model.model.layers[0].mlp  # gate/up from one fused product, then down_proj
    hidden = CONFIG["hidden_size"]
    check_graph_replay(mlp, [torch.randn(1, m, hidden, device="cuda", dtype=torch.float16) for m in (1, 5)])
