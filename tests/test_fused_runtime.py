"""Fused QuIP# linears (self_attn.qkv_proj, mlp.upgate_proj) at run time: a toy fused e8p-2
checkpoint -> import -> build llvm -> load; logits equal the dequantized reference, one fused
product per layer per forward (eager, generate and torch.compile), bad fused metadata refused."""
import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import qcompile as qc
from qcompile.errors import QCompileError
from qcompile.formats import quipsharp_io as qio
from qcompile.runtime.fused import FusedPart, FusedQuantLinear
from qcompile.runtime.linear import QuantLinear
from test_e8p_io import CONFIG, model_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def build_fused_artifact(root, target):
    """(artifact, quantized, unquantized) of the toy fused e8p-2 model: QuIP# export -> import ->
    qcompile build for ``target`` (shared with the GPU test)."""
    from qcompile.model.build import build

    quantized, unq = model_weights("e8p-2")
    src = qio.export_quipsharp(root / "src", dict(CONFIG), quantized, unq)
    ck = qio.import_checkpoint(src, root / "ck")
    return build(ck, None, target, root / "art", progress=None), quantized, unq


@pytest.fixture(scope="module")
def fused_artifact(tmp_path_factory):
    return build_fused_artifact(tmp_path_factory.mktemp("fused"), "llvm")


def reference_model(quantized, unq, fuse_scales=True):
    """The fp32 HF model whose q/k/v/up/gate weights are the split dequantized fused weights
    (fuse scales applied unless ``fuse_scales=False``) and o/down the dequantized ones."""
    fmt = qc.formats.get("e8p-2")
    cfg = {k: v for k, v in CONFIG.items() if k not in ("model_type", "architectures")}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    state = {name: t.float() for name, t in unq.items()}
    for path, qw in quantized.items():
        if "fused" in qw.meta:
            if not fuse_scales:
                qw = qc.formats.QuantizedWeight(qw.format, qw.shape, qw.tensors,
                                                {**qw.meta, "fused": {**qw.meta["fused"], "fuse_scales": [1.0] * len(qw.meta["fused"]["sizes"])}})
            parent = path.rpartition(".")[0]
            state.update({f"{parent}.{part}.weight": W for part, W in qio.split_dequantized(qw).items()})
        else:
            state[f"{path}.weight"] = fmt.dequantize(qw)
    model.load_state_dict(state, strict=True)
    return model


def count_products(model):
    """{fused module path: number of fused products computed} (patched on the instances)."""
    counts = {}
    for path, mod in model.named_modules():
        if isinstance(mod, FusedQuantLinear):
            counts[path] = 0

            def counted(x2, mod=mod, path=path):
                counts[path] += 1
                return type(mod).product(mod, x2)

            mod.product = counted
    return counts


def test_fused_layers_load_and_match_the_dequantized_reference(fused_artifact):
    art, quantized, unq = fused_artifact
    model = qc.load(art)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert type(attn.qkv_proj) is FusedQuantLinear and type(mlp.upgate_proj) is FusedQuantLinear
    assert all(type(getattr(attn, p)) is FusedPart for p in ("q_proj", "k_proj", "v_proj"))
    assert type(attn.o_proj) is QuantLinear and type(mlp.down_proj) is QuantLinear  # non-fused untouched
    assert mlp.upgate_proj.parts == ["up_proj", "gate_proj"] and attn.qkv_proj.sizes == [128, 64, 64]
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.qkv_proj.qidxs" in keys and not any(".q_proj." in k for k in keys)

    counts = count_products(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits
        want = reference_model(quantized, unq)(ids).logits
        unscaled = reference_model(quantized, unq, fuse_scales=False)(ids).logits
    assert counts == {f"model.layers.{i}.{n}": 1 for i in range(2) for n in ("self_attn.qkv_proj", "mlp.upgate_proj")}
    assert all(m.pending is None for m in model.modules() if isinstance(m, FusedQuantLinear))  # cleared after the call
    # Per linear the kernels are within fp16 rounding of the reference (test_every_linear_...); the toy
    # weights are unscaled randn (activations ~100, sharp softmax), which amplifies that to ~1% of the
    # logits over 2 layers, while leaving out the fuse scales moves them by ~20%.
    err = ((got - want).norm() / want.norm()).item()
    assert err < 0.02, err
    assert ((unscaled - want).norm() / want.norm()).item() > 10 * err  # the fuse scales matter at this tolerance
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_every_linear_matches_its_dequantized_weight(fused_artifact):
    """Each part (and each plain linear) on the same input as the reference's linear: fp16 rounding only.
    Called on their own (not from the parent's forward), the parts compute the fused product themselves."""
    art, quantized, unq = fused_artifact
    model, ref = qc.load(art), reference_model(quantized, unq)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(3)).half().float()
    with torch.no_grad():
        for i in range(2):
            for parent, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  ("mlp", ("up_proj", "gate_proj", "down_proj"))):
                for name in names:
                    got = getattr(getattr(model.model.layers[i], parent), name)(x)
                    want = getattr(getattr(ref.model.layers[i], parent), name)(x)
                    assert got.shape == want.shape and got.dtype == torch.float32
                    rel = ((got - want).norm() / want.norm()).item()
                    assert rel < 2e-3, (i, name, rel)  # ~5e-4 measured: fp16 output rounding


def test_generate_computes_one_product_per_layer_per_forward(fused_artifact):
    art, _, _ = fused_artifact
    model = qc.load(art)
    counts = count_products(model)
    calls = []
    model.model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (1, 8) and torch.equal(out[0, :4], ids[0])
    assert len(calls) >= 4 and set(counts.values()) == {len(calls)}


def test_torch_compile_fullgraph_one_fused_kernel_call(fused_artifact):
    """The pre-hooks are traced into the graph: one quant_linear_rht per linear (2 fused + 2 plain per
    layer), not one per part."""
    art, _, _ = fused_artifact
    model = qc.load(art)
    layer = model.model.layers[0]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ops = []
    x = torch.randn(1, 6, 128, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(6)[None]
    emb = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        eager = layer(x, position_embeddings=emb, position_ids=pos)
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend=backend, fullgraph=True)
        got = compiled(x, position_embeddings=emb, position_ids=pos)
    eager = eager[0] if isinstance(eager, tuple) else eager
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, eager)
    assert len(graphs) == 1
    ops = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function" and "qcompile" in str(n.target)]
    assert len(ops) == 4, ops


# --- bad fused metadata ------------------------------------------------------------------------------
def edited_artifact(src, tmp_path, edit):
    out = tmp_path / "art"
    shutil.copytree(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    layer = next(entry for entry in manifest["layers"] if entry["name"] == "model.layers.1.self_attn.qkv_proj")
    edit(layer)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("edit, msg", [
    (lambda e: e["fused"].update(parts=["q_proj", "x_proj", "v_proj"]),
     "fused part 'x_proj' is not a linear of model.layers.1.self_attn \\(its linears: k_proj, o_proj, q_proj, v_proj\\)"),
    (lambda e: e["fused"].update(sizes=[64, 128, 64]), "fused part q_proj is 64x128 but the model's .*q_proj is 128x128"),
    (lambda e: e["fused"].update(sizes=[128, 64, 32]), "add up to 224, not the layer's 256 outputs"),
    (lambda e: e["fused"].update(fuse_scales=[1.0, 2.0]), "fuse_scales must be 3 finite numbers"),
    (lambda e: e["fused"].update(parts=["q_proj", "q_proj", "v_proj"]), "fused parts must be distinct"),
    (lambda e: e.pop("fused"), "fused QuIP# linear but the manifest does not list its parts"),
])
def test_bad_fused_metadata(fused_artifact, tmp_path, edit, msg):
    art = edited_artifact(fused_artifact[0], tmp_path, edit)
    with pytest.raises(QCompileError, match=msg) as err:
        qc.load(art)
    assert "\n" not in str(err.value) and "model.layers.1.self_attn.qkv_proj" in str(err.value)


def test_inspect_lists_the_fused_layers(fused_artifact):
    from qcompile.cli import format_manifest
    from qcompile.model.artifact import read_manifest

    art, _, _ = fused_artifact
    text = format_manifest(read_manifest(art))
    assert "fused layers    4 (q_proj/k_proj/v_proj, up_proj/gate_proj" in text
