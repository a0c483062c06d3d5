"""Step 3 of the recipe: train the small Llama on the prepared token data and save it to the cache.

    python3 -m models.tinyllama.train --data .models-data/tinyllama --device auto [--max-minutes 4]
                                      [--steps N] [--batch-size B] [--out DIR]

Needs only torch, transformers, tokenizers, numpy and this checkout (no apt, no network): the
corpus and the tokenizer come prepared in ``--data`` (made by ``python3 -m models.tinyllama.prepare``).

Deterministic for a given machine and software: the weights are drawn from a seeded generator
(independent of transformers' own initialisation), the data order comes from a seeded generator,
and torch runs with deterministic algorithms (warning where an op has none). bf16 autocast on CUDA,
fp32 on the CPU. AdamW, linear warmup then cosine decay. The validation loss is measured every
``eval_every`` steps and the best weights are kept (so too many epochs cannot overfit the result).
``--max-minutes`` is only a safety cap on the wall time of the training loop: the schedule (steps,
learning-rate curve) never depends on the machine's speed, so a run is reproducible; a run stopped
by the cap says so in its log and in training_record.json.

The model is saved (fp16 safetensors, with the tokenizer and training_record.json) to
``~/.cache/qcompile/models/tiny-llama-trained`` (``$QCOMPILE_CACHE_DIR`` moves it) or ``--out``,
through a temporary directory renamed into place.
"""
from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before torch starts CUDA

import argparse  # noqa: E402
import json  # noqa: E402
import lzma  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

CONFIG_FILE = Path(__file__).with_name("config.json")
TRAINED_NAME = "tiny-llama-trained"
DEFAULT_DATA = REPO / ".models-data" / "tinyllama"
PREPARE = "python3 -m models.tinyllama.prepare"


class RecipeError(Exception):
    pass


def cache_root() -> Path:
    env = os.environ.get("QCOMPILE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "qcompile"


def load_config(path=CONFIG_FILE) -> dict:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- data

def load_data(data_dir: Path, splits=("train", "validation", "test")):
    """({split: LongTensor of token ids}, data.json) from a prepared-data directory, sha256-checked."""
    import hashlib

    import numpy as np
    import torch

    info_path = data_dir / "data.json"
    if not info_path.is_file():
        raise RecipeError(f"no prepared data in {data_dir} (no data.json); make it with `{PREPARE}` on a machine "
                          f"with apt and carry .models-data")
    with open(info_path) as f:
        info = json.load(f)
    out = {}
    for s in splits:
        raw = lzma.decompress((data_dir / f"{s}.u16.xz").read_bytes())
        sha = hashlib.sha256(raw).hexdigest()
        if sha != info["splits"][s]["sha256"]:
            raise RecipeError(f"{data_dir / (s + '.u16.xz')} does not match data.json (sha256 {sha[:16]}…); "
                              f"rerun `{PREPARE}`")
        out[s] = torch.from_numpy(np.frombuffer(raw, dtype="<u2").astype(np.int64))
    return out, info


class Batches:
    """Deterministic epochs: each epoch cuts the stream into sequences of context+1 tokens at a
    random offset and visits them in a random order (both from one seeded generator)."""

    def __init__(self, tokens, context: int, batch_size: int, seed: int):
        import torch

        self.tokens, self.context, self.batch_size = tokens, context, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.order, self.pos = 0, None, 0
        n = tokens.numel() - 1 - context  # the last start that still has context+1 tokens
        if n < context * batch_size:
            raise RecipeError(f"train split too small ({tokens.numel()} tokens) for batch {batch_size} x {context}")

    def _new_epoch(self):
        import torch

        offset = int(torch.randint(0, self.context, (1,), generator=self.gen))
        count = (self.tokens.numel() - 1 - offset) // self.context
        starts = offset + self.context * torch.arange(count)
        self.order = starts[torch.randperm(count, generator=self.gen)]
        self.pos = 0
        self.epoch += 1

    def next(self):
        import torch

        if self.order is None or self.pos + self.batch_size > self.order.numel():
            self._new_epoch()
        starts = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        idx = starts.unsqueeze(1) + torch.arange(self.context + 1).unsqueeze(0)
        return self.tokens[idx]  # [B, context+1]

    @property
    def epochs_done(self) -> float:
        if self.order is None:
            return 0.0
        return self.epoch - 1 + self.pos / self.order.numel()


# ---------------------------------------------------------------------------------------------- model

def llama_config(mcfg: dict, tok: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=mcfg["vocab_size"], hidden_size=mcfg["hidden_size"],
        intermediate_size=mcfg["intermediate_size"], num_hidden_layers=mcfg["num_hidden_layers"],
        num_attention_heads=mcfg["num_attention_heads"], num_key_value_heads=mcfg["num_key_value_heads"],
        head_dim=mcfg["hidden_size"] // mcfg["num_attention_heads"],
        max_position_embeddings=mcfg["max_position_embeddings"], rope_theta=mcfg["rope_theta"],
        rms_norm_eps=mcfg["rms_norm_eps"], tie_word_embeddings=mcfg["tie_word_embeddings"],
        hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"], pad_token_id=tok["pad_token_id"],
        architectures=["LlamaForCausalLM"])


def build_model(mcfg: dict, tok: dict, seed: int, init_std: float):
    """LlamaForCausalLM with weights from a seeded generator: N(0, init_std) for embeddings and
    linears, N(0, init_std / sqrt(2 * layers)) for the residual outputs (o_proj, down_proj), 1 for
    the RMSNorm gains."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(mcfg, tok))
    gen = torch.Generator().manual_seed(seed)
    out_std = init_std / math.sqrt(2 * mcfg["num_hidden_layers"])
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * out_std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    return model


def lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from peak down to peak * min_ratio at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def chunk_loss(model, tokens, context: int, device, autocast, max_chunks: int = 64, batch: int = 16) -> float:
    """Mean next-token loss over the first ``max_chunks`` non-overlapping windows of ``tokens``
    (a quick, fixed validation estimate)."""
    import torch

    n = min(max_chunks, (tokens.numel() - 1) // context)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, batch):
            starts = torch.arange(i, min(n, i + batch)) * context
            idx = starts.unsqueeze(1) + torch.arange(context + 1).unsqueeze(0)
            seq = tokens[idx].to(device)
            with autocast():
                logits = model(input_ids=seq[:, :-1], use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                     seq[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += seq[:, 1:].numel()
    model.train()
    return total / count


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None, cfg=None):
    cfg = cfg or load_config()
    t = cfg["train"]
    p = argparse.ArgumentParser(prog="python3 -m models.tinyllama.train",
                                description="Train the small Llama of qcompile's quality measurements.")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="prepared data directory (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help=f"model directory to write (default: <cache>/models/{TRAINED_NAME}, "
                        f"cache = $QCOMPILE_CACHE_DIR or ~/.cache/qcompile)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cpu, cuda:N")
    p.add_argument("--steps", type=int, default=t["steps"], help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=t["batch_size"], help="sequences a step (default: %(default)s)")
    p.add_argument("--context", type=int, default=t["context"], help="training sequence length (default: %(default)s)")
    p.add_argument("--lr", type=float, default=t["lr"], help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=t["warmup_steps"])
    p.add_argument("--seed", type=int, default=t["seed"])
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock cap on the training loop; the schedule shrinks to fit (default: none)")
    p.add_argument("--log-every", type=int, default=t["log_every"])
    p.add_argument("--eval-every", type=int, default=t["eval_every"])
    p.add_argument("--eval-max-tokens", type=int, default=None,
                   help="score only the first N tokens of validation/test at the end (default: all)")
    p.add_argument("--no-keep-best", action="store_true", help="save the last weights, not the best-validation ones")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", default=True, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu or auto")
    return dev


def train(args, cfg=None, log=print) -> Path:
    import contextlib

    import torch
    import transformers

    cfg = cfg or load_config()
    tcfg, mcfg = cfg["train"], dict(cfg["model"])
    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data_dir = Path(args.data)
    data, info = load_data(data_dir)
    tok = info["tokenizer"]
    if tok["vocab_size"] != mcfg["vocab_size"]:
        log(f"note: vocab_size {mcfg['vocab_size']} in config.json -> {tok['vocab_size']} from the tokenizer")
        mcfg["vocab_size"] = tok["vocab_size"]
    if args.context > mcfg["max_position_embeddings"]:
        raise RecipeError(f"--context {args.context} exceeds max_position_embeddings {mcfg['max_position_embeddings']}")

    model = build_model(mcfg, tok, args.seed, tcfg["init_std"]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.startswith("model.layers"))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt_kwargs = dict(lr=args.lr, betas=tuple(tcfg["betas"]), eps=1e-8)
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kwargs)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else contextlib.nullcontext)
    batches = Batches(data["train"], args.context, args.batch_size, args.seed)
    val_tokens = data["validation"]
    tokens_per_step = args.batch_size * args.context
    log(f"model: {n_params:,} parameters ({n_linear:,} in decoder linears), {mcfg['num_hidden_layers']} layers, "
        f"hidden {mcfg['hidden_size']}, mlp {mcfg['intermediate_size']}, vocab {mcfg['vocab_size']}; device {device}"
        f"{' (bf16 autocast)' if device.type == 'cuda' else ' (fp32)'}")
    log(f"data: {data['train'].numel():,} train tokens; {args.steps} steps x {tokens_per_step:,} tokens = "
        f"{args.steps * tokens_per_step / data['train'].numel():.1f} epochs")

    cap_s = args.max_minutes * 60 if args.max_minutes else None
    total_steps = args.steps
    history, evals = [], []
    best = (float("inf"), -1, None)  # (val loss, step, state on the CPU)
    loss_window = []
    model.train()
    t_loop = time.time()
    t_log, tokens_since = t_loop, 0
    step = 0
    stopped_by_cap = False
    while step < total_steps:
        if cap_s is not None and time.time() - t_loop >= cap_s:
            stopped_by_cap = True
            log(f"stopping at step {step}: --max-minutes {args.max_minutes} reached")
            break
        warmup = min(args.warmup_steps, max(1, total_steps // 5))  # a shortened schedule warms up less
        lr = lr_at(step, total_steps, warmup, args.lr, tcfg["min_lr_ratio"])
        for g in opt.param_groups:
            g["lr"] = lr
        seq = batches.next().to(device, non_blocking=True)
        with autocast():
            logits = model(input_ids=seq[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
        opt.step()
        step += 1
        tokens_since += tokens_per_step
        loss_window.append(loss.detach())
        if step % args.log_every == 0 or step == total_steps:
            train_loss = float(torch.stack(loss_window).mean())
            loss_window = []
            now = time.time()
            tps = tokens_since / max(1e-9, now - t_log)
            t_log, tokens_since = now, 0
            history.append({"step": step, "loss": round(train_loss, 4), "lr": lr, "epoch": round(batches.epochs_done, 3),
                            "seconds": round(now - t_loop, 1)})
            log(f"step {step:>5}/{total_steps} loss {train_loss:.4f} lr {lr:.2e} epoch {batches.epochs_done:5.2f} "
                f"{tps / 1e3:8.1f}k tok/s  {now - t_loop:6.0f} s")
        if step % args.eval_every == 0 or step == total_steps:
            vl = chunk_loss(model, val_tokens, args.context, device, autocast)
            evals.append({"step": step, "val_loss": round(vl, 4), "val_ppl": round(math.exp(vl), 3)})
            mark = ""
            if vl < best[0]:
                best = (vl, step, None if args.no_keep_best else
                        {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
                mark = "  (best)"
            log(f"  validation (first {min(64, (val_tokens.numel() - 1) // args.context)} windows) loss {vl:.4f} "
                f"ppl {math.exp(vl):.2f}{mark}")
    train_seconds = time.time() - t_loop
    final_train_loss = history[-1]["loss"] if history else float("nan")
    kept_step = step
    if not args.no_keep_best and best[2] is not None and best[1] != step:
        model.load_state_dict(best[2])
        kept_step = best[1]
        log(f"keeping the weights of step {kept_step} (best validation loss {best[0]:.4f})")

    # save: fp16 weights, evaluated as `qcompile eval ppl` will evaluate them
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    save_dtype = getattr(torch, tcfg["save_dtype"])
    model = model.to(save_dtype).eval()
    model.config.use_cache = True
    model.generation_config = GenerationConfig(bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"],
                                               pad_token_id=tok["pad_token_id"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(data_dir))  # any transformers version
    out = Path(args.out) if args.out else cache_root() / "models" / TRAINED_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        eval_model = model if device.type == "cuda" else model.float()
        ppl = final_eval(eval_model, data, args.eval_max_tokens, log)
        record = {
            "recipe": cfg["recipe"], "config": cfg, "args": {k: v for k, v in vars(args).items() if k != "overwrite"},
            "corpus": info["corpus"], "corpus_splits": {s: v["sha256"] for s, v in info["corpus_splits"].items()},
            "token_data": {s: {"tokens": v["tokens"], "sha256": v["sha256"]} for s, v in info["splits"].items()},
            "train_fraction_kept": info.get("train_fraction_kept"), "tokenizer_sha256": tok["sha256"],
            "parameters": n_params, "decoder_linear_parameters": n_linear,
            "steps_planned": args.steps, "steps_scheduled": total_steps, "steps_done": step,
            "stopped_by_max_minutes": stopped_by_cap,
            "kept_step": kept_step, "tokens_seen": step * tokens_per_step,
            "epochs": round(batches.epochs_done, 3), "final_train_loss": final_train_loss,
            "val_ppl": ppl["validation"]["ppl"], "test_ppl": ppl["test"]["ppl"], "final_eval": ppl,
            "validation_curve": evals, "loss_curve": history,
            "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - t_start, 1),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                     f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]},
            "saved_dtype": tcfg["save_dtype"],
        }
        with open(tmp / "training_record.json", "w") as f:
            json.dump(record, f, indent=1)
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"saved {out}: val ppl {ppl['validation']['ppl']:.3f}, test ppl {ppl['test']['ppl']:.3f} "
        f"(context {ppl['test']['context']}, stride {ppl['test']['stride']}); train {train_seconds:.0f} s, "
        f"all {time.time() - t_start:.0f} s")
    return out


def final_eval(model, data, max_tokens, log) -> dict:
    """Sliding-window perplexity of validation and test at ``qcompile eval ppl``'s defaults."""
    from qcompile.model.evaluate import DEFAULT_CONTEXT, DEFAULT_STRIDE, perplexity

    context = min(DEFAULT_CONTEXT, model.config.max_position_embeddings)
    stride = DEFAULT_STRIDE if context == DEFAULT_CONTEXT else context // 2
    out = {}
    for s in ("validation", "test"):
        ids = data[s] if max_tokens is None else data[s][:max_tokens]
        r = perplexity(model, ids, context, stride, batch_size=32)
        out[s] = {"ppl": round(r.ppl, 4), "nll": round(r.nll, 6), "tokens": r.tokens, "context": r.context,
                  "stride": r.stride}
        log(f"  {s} perplexity {r.ppl:.3f} on {r.tokens:,} tokens (context {r.context}, stride {r.stride})")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
