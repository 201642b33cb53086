"""Generator training throughput vs the bare frozen LM, in one process.

Times one optimizer step of :class:`amrg.models.generator.ReportGenerator` (prefix [F, Q, F', prompt,
BOS] + report, V-/R-Hopfield over banks of the paper's sizes, frozen LM, trainable projections) and,
on the same LM, a bare forward+backward of ``inputs_embeds`` of the same sequence length (the floor
any prefix-embedding method pays when the LM is frozen: gradients still flow back through it).
Prints samples/s for both, their ratio and the peak memory.

    python bench/generator_throughput.py                   # embedded-default widths, CPU
    python bench/generator_throughput.py --preset llama7b --device cuda --precision bf16
                                                           # Llama-2-7B-shaped random LM (paper widths)
"""

from __future__ import annotations

import argparse
import resource

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from amrg.config import Generator, Hopfield
from amrg.models.generator import ReportGenerator
from amrg.models.llm import train_word_tokenizer

from _timing import timed  # bench/ is on sys.path when a bench runs as a script

PRESETS = {  # LM shape, visual tokens (2 views), visual width, query width, bank shapes, hopfield dim
    "tiny": dict(vocab=986, llm=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
                 tokens=2 * 16, visual_dim=64, query_dim=64, n_v=1130, d_v=64, n_r=1200, d_r=384, hop=64),
    "llama7b": dict(vocab=32000, llm=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
                    tokens=2 * 49, visual_dim=1024, query_dim=768, n_v=6943, d_v=1024, n_r=6000, d_r=768, hop=768),
}


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--report-tokens", type=int, default=60)
    ap.add_argument("--trainable", choices=["none", "full"], default="none")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    p, device = PRESETS[a.preset], torch.device(a.device)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    torch.manual_seed(0)

    texts = ["the heart is normal in size . the lungs are clear . no pleural effusion ."] * 3
    tok: PreTrainedTokenizerFast = train_word_tokenizer(texts, 1)
    cfg = LlamaConfig(vocab_size=p["vocab"], max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **p["llm"])
    llm = LlamaForCausalLM(cfg).to(device, dtype if a.trainable == "none" else torch.float32)
    for w in llm.parameters():
        w.requires_grad_(a.trainable == "full")
    if a.gradient_checkpointing:
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    hop = Hopfield(dim=p["hop"], beta=4.0)
    model = ReportGenerator(llm, tok, p["visual_dim"], p["query_dim"], torch.randn(p["n_v"], p["d_v"]),
                            torch.randn(p["n_r"], p["d_r"]), hop, Generator().prompt).to(device)
    opt = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=1e-4)
    b, t = a.batch_size, a.report_tokens
    f = torch.randn(b, p["tokens"], p["visual_dim"], device=device)
    fd = torch.randn(b, 14, p["query_dim"], device=device)
    ids = torch.randint(4, len(tok), (b, t), device=device)
    mask = torch.ones_like(ids)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")

    def generator_step():
        with autocast:
            loss = model(f, fd, ids, mask).float()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    prefix_len = model.prefix(f[:1], fd[:1]).shape[1]
    embeds = torch.randn(b, prefix_len + t, cfg.hidden_size, device=device, requires_grad=True)
    labels = torch.cat([torch.full((b, prefix_len), -100, device=device), ids], dim=1)

    def bare_step():
        with autocast:
            loss = llm(inputs_embeds=embeds, labels=labels).loss.float()
        loss.backward()
        embeds.grad = None

    bare = timed(bare_step, a.repeats, device)
    gen = timed(generator_step, a.repeats, device)
    n_trainable = sum(w.numel() for w in model.parameters() if w.requires_grad)
    print(f"preset={a.preset} device={device} precision={a.precision} batch={b} sequence={prefix_len}+{t} "
          f"LM trainable={a.trainable} trainable params={n_trainable / 1e6:.1f}M threads={torch.get_num_threads()}")
    print(f"bare frozen-LM fwd+bwd : {b / bare:8.2f} samples/s")
    print(f"generator train step   : {b / gen:8.2f} samples/s")
    print(f"ratio generator / bare : {bare / gen:8.2f}")
    print(f"peak memory            : {peak_mb(device):8.0f} MiB ({'CUDA allocator' if device.type == 'cuda' else 'max RSS'})")


if __name__ == "__main__":
    main()
