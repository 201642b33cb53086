"""Vision Mamba throughput (issue 17): training steps (forward + backward) in images/s.

CPU: ``amrg_vim_tiny_pz16`` (64 wide, 2 deep, 4-way scan, 196 patches + cls at 224 px) against timm's Swin
of the same width, depth and token count (16-px patches, one stage of 2 blocks, 2 heads, window 7), in the
same run, as a ratio. CUDA (if present): ``amrg_vim_base_pz16`` / ``amrg_vim_large_pz16`` under bf16
autocast with the torch scan and with ``mamba_ssm``'s kernel (when it imports), with and without block
gradient checkpointing, and the peak memory.

    OMP_NUM_THREADS=1 python bench/vim_throughput.py --batch 4 --repeats 3
    python bench/vim_throughput.py --skip-cpu --gpu-batch 8 --repeats 3      # on a CUDA machine

The torch scan keeps about 3·log2(``scan_chunk``) copies of the ``(B, D, N, L)`` state tensor per direction
for the backward, so large batches of the big presets need ``--checkpointing on``.
"""

from __future__ import annotations

import argparse
import contextlib

import timm
import torch

from amrg.models.mamba import cuda_selective_scan
from amrg.models.vim import VisionMamba  # importing it registers amrg_vim_* in timm

from _timing import timed  # bench/ is on sys.path when a bench runs as a script

SWIN_LIKE_TINY = dict(patch_size=16, embed_dim=64, depths=[2], num_heads=[2], window_size=7)


def train_step(model: torch.nn.Module, x: torch.Tensor, bf16: bool):
    def step():
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            out = model.forward_features(x)
        out.float().square().mean().backward()
    return step


def images_per_s(model, batch, size, device, repeats, bf16=False) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    return batch / timed(train_step(model.train(), x, bf16), repeats, device)


def cpu(a) -> None:
    torch.manual_seed(0)
    vim = timm.create_model("amrg_vim_tiny_pz16", num_classes=0, img_size=a.size, scan_chunk=a.chunk)
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, img_size=a.size, **SWIN_LIKE_TINY)
    assert isinstance(vim, VisionMamba)
    n_vim = vim.forward_features(torch.zeros(1, 3, a.size, a.size)).shape[1]
    n_swin = swin.forward_features(torch.zeros(1, 3, a.size, a.size)).flatten(1, 2).shape[1]
    v = images_per_s(vim, a.batch, a.size, torch.device("cpu"), a.repeats)
    s = images_per_s(swin, a.batch, a.size, torch.device("cpu"), a.repeats)
    print(f"cpu threads={torch.get_num_threads()} batch={a.batch} size={a.size} scan_chunk={a.chunk}")
    print(f"  vim_tiny  (64 x 2, 4way, {n_vim} tokens): {v:8.2f} img/s  "
          f"({sum(p.numel() for p in vim.parameters()) / 1e6:.2f} M params)")
    print(f"  swin-like (64 x 2, window 7, {n_swin} tokens): {s:8.2f} img/s  "
          f"({sum(p.numel() for p in swin.parameters()) / 1e6:.2f} M params)")
    print(f"  vim / swin = {v / s:.2f}")


def gpu(a) -> None:
    device = torch.device("cuda")
    kernel = cuda_selective_scan() is not None
    print(f"cuda {torch.cuda.get_device_name()} batch={a.gpu_batch} size={a.size} bf16 autocast, "
          f"mamba_ssm kernel {'available' if kernel else 'not importable'}")
    for name in ("amrg_vim_base_pz16", "amrg_vim_large_pz16"):
        for backend in ("torch", "cuda"):
            if backend == "cuda" and not kernel:
                print(f"  {name:22s} {backend:5s}: skipped (mamba_ssm does not import)")
                continue
            for ckpt in ({"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]):
                torch.manual_seed(0)
                model = timm.create_model(name, num_classes=0, img_size=a.size, backend=backend,
                                          scan_chunk=a.chunk).to(device)
                model.set_grad_checkpointing(ckpt)
                torch.cuda.reset_peak_memory_stats()
                try:
                    r = images_per_s(model, a.gpu_batch, a.size, device, a.repeats, bf16=True)
                    mem = torch.cuda.max_memory_allocated() / 2**30
                    print(f"  {name:22s} {backend:5s} ckpt={'on ' if ckpt else 'off'}: {r:8.1f} img/s, "
                          f"peak {mem:5.1f} GiB", flush=True)
                except torch.cuda.OutOfMemoryError:
                    print(f"  {name:22s} {backend:5s} ckpt={'on ' if ckpt else 'off'}: out of memory", flush=True)
                del model
                torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="CPU batch")
    ap.add_argument("--gpu-batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--chunk", type=int, default=16, help="mamba scan_chunk")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpointing", default="both", choices=["off", "on", "both"], help="GPU runs")
    ap.add_argument("--skip-cpu", action="store_true")
    a = ap.parse_args()
    if not a.skip_cpu:
        cpu(a)
    if torch.cuda.is_available():
        gpu(a)


if __name__ == "__main__":
    main()
