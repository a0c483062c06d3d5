"""build -> artifact -> load on the local GPU: logits, generate, CUDA graphs and the stored fatbin."""
import pytest
import torch

import qcompile as qc
from qcompile.model.build import build

pytestmark = pytest.mark.gpu
FORMAT = "int4-g128"


@pytest.fixture(scope="module")
def gpu_artifact(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-artifacts") / "tiny-int4-auto"
    return build(default_model, FORMAT, "auto", out, progress=None)


def test_artifact_targets_this_gpu(gpu_artifact):
    major, minor = torch.cuda.get_device_capability()
    manifest = qc.load(gpu_artifact).qcompile_manifest
    assert manifest["target"] == f"cuda-sm_{major}{minor}"
    assert manifest["kernels"]["fatbin"] == "kernels.fatbin"


def test_logits_and_generate(gpu_artifact, default_model, dequantized_reference):
    model = qc.load(gpu_artifact)
    assert model.device.type == "cuda" and model.dtype == torch.float16
    tok = model.qcompile_tokenizer
    ids = tok(["The quick brown fox jumps", "over the lazy dog, again!"], return_tensors="pt").input_ids.cuda()
    ref = dequantized_reference(default_model, FORMAT, "cuda")
    with torch.no_grad():
        got, want = model(ids).logits.float(), ref(ids).logits
    # The whole model runs in fp16 here (norms, attention, residuals too), not only the linears:
    # looser than the CPU test's 0.03, still far below the int4 error (~1 on these logits).
    err = (got - want).abs().max().item()
    assert err < 0.15, err
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9

    prompt = tok("hello", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                             min_new_tokens=8, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 8)


def test_cuda_graph_capture(gpu_artifact, check_graph_replay):
    model = qc.load(gpu_artifact)
    lin = model.model.layers[0].mlp.gate_proj
    # exact bucket, padded GEMV bucket, padded GEMM bucket
    check_graph_replay(lin, [torch.randn(m, lin.in_features, device="cuda", dtype=torch.float16) for m in (1, 5, 40)])


def test_loading_uses_the_stored_fatbin(gpu_artifact, monkeypatch):
    from tvm.support import nvcc

    from qcompile.runtime.module import load_kernels

    def no_compiler(*args, **kwargs):
        raise RuntimeError("a CUDA compiler ran while loading an artifact that carries its fatbin")

    monkeypatch.setattr(nvcc, "tvm_callback_cuda_compile", no_compiler)
    monkeypatch.setattr(nvcc, "compile_cuda", no_compiler)
    module = load_kernels(str(gpu_artifact / "kernels.so"), str(gpu_artifact / "kernels.fatbin"),
                          str(gpu_artifact / "kernels.cu"))
    model = qc.load(gpu_artifact)  # the whole load path, too
    lin = model.model.layers[0].self_attn.q_proj
    name = f"int4_g128_n{lin.out_features}_k{lin.in_features}_m1"
    x = torch.randn(1, lin.in_features, device="cuda", dtype=torch.float16)
    y = torch.empty(1, lin.out_features, device="cuda", dtype=torch.float16)
    module[name](x, *lin.packed(), y)
    torch.testing.assert_close(y, lin(x), rtol=0, atol=0)
