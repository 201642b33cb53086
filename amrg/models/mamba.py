"""The selective state-space mixer of Mamba (S6; Gu & Dao 2023) in plain PyTorch, for Vision Mamba (issue 17).

One S6 scan per direction, on a sequence ``u (B, D, L)`` with input-dependent step Δ, ``B`` and ``C``:

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t,     y_t = C_t · h_t + D u_t          (Mamba eq. 2a-2b, 4)

with the discretisation Ā = exp(ΔA), B̄ ≈ ΔB of the released kernels (:func:`discretize`),
Δ = softplus(Δ + dt_bias) and the gate y ⊙ silu(z) applied once after the directions are combined.

:func:`selective_scan` is exact and has no Python loop over tokens or chunks: the sequence is cut into
chunks of ``chunk`` tokens; inside every chunk (all chunks at once) the linear recurrence is an
associative scan (:func:`associative_scan`, Hillis-Steele: log2(chunk) vectorised steps), and the states
entering the chunks are the same scan one level up, over the chunks' total decays and final states. It
multiplies decays exp(ΔA) <= 1 only, so nothing overflows, and it is the recurrence re-associated (equal
to the loop up to rounding). Memory for the backward is about 3·log2(chunk) times the ``(B, D, N, L)``
state tensor. :func:`selective_scan_ref` is the sequential loop it is tested against (``mamba_ssm``'s
reference).

:class:`MambaMixer` is MambaXray-VL's ``Mamba`` module (``arm/Finetuning/mamba_simple.py`` of
Event-AHU/Medical_Image_Analysis, itself Vim's fork of ``mamba_ssm``) with the same parameter names:
``in_proj``, per direction ``conv1d{s}``, ``x_proj{s}``, ``dt_proj{s}``, ``A{s}_log``, ``D{s}``, and ``out_proj``,
where the suffix ``s`` is ``""`` (forward), ``_b`` (backward), ``_c`` (column-major) and ``_c_b`` (column-major
backward). ``scan``:

* ``forward``: one causal scan (``bimamba_type="none"``, MambaXray-VL's ARM pre-training encoder);
* ``bi``: forward + the flipped scan of the flipped sequence, averaged (Vim's ``v2`` with ``if_devide_out``);
* ``4way``: also the column-major order of the patch grid and its flip, the four averaged (MambaXray-VL's
  fine-tune ``v3``); a class token keeps its sequence position in every order.

``backend``: ``torch`` (:func:`selective_scan`), ``cuda`` (``mamba_ssm``'s ``selective_scan_fn`` kernel,
which must import) or ``auto`` (the kernel for CUDA tensors when it imports, else torch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCANS = {"forward": ("",), "bi": ("", "_b"), "4way": ("", "_b", "_c", "_c_b")}  # scan -> direction suffixes
BACKENDS = ("auto", "torch", "cuda")
DEFAULT_CHUNK = 16  # tokens per chunk of the torch scan (fastest of 4..32 on CPU at 197 tokens)
# Mamba's initialisation of the step Δ (mamba_simple.py): softplus(dt_bias) log-uniform in [DT_MIN, DT_MAX]
DT_MIN, DT_MAX, DT_INIT_FLOOR, DT_SCALE = 1e-3, 1e-1, 1e-4, 1.0


# ----------------------------------------------------------------------------- the scan
def step_size(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    """Δ = softplus(Δ + dt_bias) (the kernels' ``delta_bias``/``delta_softplus``); ``(B, D, L)``."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if delta_softplus else delta


def discretize(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, u: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold for A, Euler for B (Mamba eq. 4 as the kernels run it): log Ā = ΔA and B̄u = ΔBu,
    both ``(B, D, N, L)`` from Δ, u ``(B, D, L)``, A ``(D, N)``, B ``(B, N, L)``."""
    log_decay = delta[:, :, None, :] * A[None, :, :, None]
    inputs = (delta * u)[:, :, None, :] * B[:, None, :, :]
    return log_decay, inputs


def associative_scan(decay: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of ``h_t = decay_t h_{t-1} + x_t`` along the last dim (h_{-1} = 0), Hillis-Steele:
    log2(T) vectorised steps of the associative combine (a, x) ∘ (a', x') = (a a', a' x + x'), each a shift
    by k (``F.pad`` with (k, -k): zeros, or ones for the decays, enter on the left). Returns the cumulative
    decays ``Π_{k<=t} decay_k`` and the states. Only products of decays in [0, 1]: no overflow."""
    k, T = 1, x.shape[-1]
    while k < T:
        x = x + decay * F.pad(x, (k, -k))
        decay = decay * F.pad(decay, (k, -k), value=1.0)
        k *= 2
    return decay, x


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, chunk: int = DEFAULT_CHUNK):
    """The S6 scan, exact and chunked (``mamba_ssm.selective_scan_fn``'s signature and result).

    u, delta, z ``(B, D, L)``; A ``(D, N)``; B, C ``(B, N, L)``; D, delta_bias ``(D,)``. Returns y ``(B, D, L)``
    in u's dtype (and the last state ``(B, D, N)``). Computed in float32 at least, autocast off.
    """
    out_dtype, L = u.dtype, u.shape[-1]
    ct = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
        delta = step_size(delta, None if delta_bias is None else delta_bias.to(ct), delta_softplus)
        log_decay, inputs = discretize(delta, A, B, u)                      # (b, d, n, L)
        pad = (-L) % chunk
        if pad:  # padded steps: decay 1, input 0 -> the state passes through unchanged
            log_decay, inputs = F.pad(log_decay, (0, pad)), F.pad(inputs, (0, pad))
        # inside each chunk, from a zero state: decay from the chunk start through t, and the states
        decay_in, local = associative_scan(log_decay.unflatten(-1, (-1, chunk)).exp(),
                                           inputs.unflatten(-1, (-1, chunk)))   # (b, d, n, c, T)
        # the same scan over the chunks (each chunk's total decay and final local state): state after chunk j
        _, after = associative_scan(decay_in[..., -1], local[..., -1])          # (b, d, n, c)
        entering = F.pad(after[..., :-1], (1, 0))                               # zero before the first chunk
        h = (local + decay_in * entering[..., None]).flatten(-2)[..., :L]       # (b, d, n, L)
        y = _skip_and_gate(torch.einsum("bdnl,bnl->bdl", h, C), u, D, z)
    y = y.to(out_dtype)
    return (y, after[..., -1]) if return_last_state else y


def _skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """y + D u (Mamba's skip), then y ⊙ silu(z) (the gate)."""
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                       delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False):
    """The recurrence of eq. 2 as a loop over tokens (``mamba_ssm``'s ``selective_scan_ref``): the oracle."""
    out_dtype = u.dtype
    ct = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    delta = step_size(delta, None if delta_bias is None else delta_bias.to(ct), delta_softplus)
    log_decay, inputs = discretize(delta, A, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = log_decay[..., t].exp() * h + inputs[..., t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[..., t]))
    y = _skip_and_gate(torch.stack(ys, dim=-1), u, D, z).to(out_dtype)
    return (y, h) if return_last_state else y


def cuda_selective_scan():
    """``mamba_ssm``'s fused ``selective_scan_fn``, or None when it does not import."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - ImportError, or a CUDA extension built for another torch
        return None
    return selective_scan_fn


# ----------------------------------------------------------------------------- scan orders
def column_major_order(grid: tuple[int, int], cls_index: int | None) -> torch.Tensor:
    """Sequence positions in MambaXray-VL's column ("vertical") scan order: the patches of the row-major
    ``grid`` read column by column, a class token (at sequence position ``cls_index``) kept in place."""
    h, w = grid
    patches = torch.arange(h * w).view(h, w).t().reshape(-1)
    if cls_index is None:
        return patches
    seq = patches + (patches >= cls_index).long()  # patch id -> its sequence position
    return torch.cat([seq[:cls_index], torch.tensor([cls_index]), seq[cls_index:]])


def scan_orders(scan: str, length: int, grid: tuple[int, int] | None, cls_index: int | None
                ) -> dict[str, torch.Tensor | None]:
    """Direction suffix -> the permutation of sequence positions it scans (None: the sequence as it is)."""
    rev = torch.arange(length - 1, -1, -1)
    orders: dict[str, torch.Tensor | None] = {"": None, "_b": rev}
    if scan == "4way":
        if grid is None:
            n = length - (cls_index is not None)
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"4way scan: {n} patch tokens are not a square grid; pass grid=(h, w)")
            grid = (side, side)
        if grid[0] * grid[1] + (cls_index is not None) != length:
            raise ValueError(f"4way scan: grid {grid} and cls_index {cls_index} do not make {length} tokens")
        col = column_major_order(grid, cls_index)
        orders.update({"_c": col, "_c_b": col.flip(0)})
    return {s: orders[s] for s in SCANS[scan]}


# ----------------------------------------------------------------------------- the mixer
class MambaMixer(nn.Module):
    """MambaXray-VL's / Vim's ``Mamba`` mixer: ``(B, L, d_model) -> (B, L, d_model)``.

    in_proj -> (x, z); per direction: reorder x, causal depthwise conv (``d_conv``) + silu, x_proj -> (Δ, B, C),
    dt_proj, S6 scan with D skip, back to sequence order; the directions' mean ⊙ silu(z); out_proj.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 1,
                 dt_rank: int | str = "auto", scan: str = "forward", backend: str = "auto",
                 scan_chunk: int = DEFAULT_CHUNK, conv_bias: bool = True, bias: bool = False):
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"unknown mamba scan {scan!r}; choose from {list(SCANS)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown mamba backend {backend!r}; choose from {list(BACKENDS)}")
        if backend == "cuda" and cuda_selective_scan() is None:
            raise ImportError("mamba.backend=cuda needs mamba_ssm (selective_scan_fn), which does not import here")
        if scan_chunk < 1:
            raise ValueError(f"mamba scan_chunk must be >= 1, got {scan_chunk}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan, self.backend, self.scan_chunk = scan, backend, scan_chunk
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        for s in SCANS[scan]:
            self.add_module(f"conv1d{s}", nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                   padding=d_conv - 1, bias=conv_bias))
            self.add_module(f"x_proj{s}", nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            self.add_module(f"dt_proj{s}", nn.Linear(self.dt_rank, self.d_inner, bias=True))
            self.register_parameter(f"A{s}_log", nn.Parameter(torch.empty(self.d_inner, d_state)))
            self.register_parameter(f"D{s}", nn.Parameter(torch.empty(self.d_inner)))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's init per direction: S4D-real A = -(1..N), D = 1, dt_proj weight U(±rank^-1/2), and dt_bias
        the inverse softplus of a step log-uniform in [DT_MIN, DT_MAX]."""
        for s in SCANS[self.scan]:
            getattr(self, f"A{s}_log").copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)
                                                       ).expand(self.d_inner, -1))
            getattr(self, f"D{s}").fill_(1.0)
            dt_proj = getattr(self, f"dt_proj{s}")
            std = self.dt_rank ** -0.5 * DT_SCALE
            nn.init.uniform_(dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
            dt = dt.clamp(min=DT_INIT_FLOOR)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            dt_proj.bias._no_reinit = True  # the released init zeroes every other Linear bias

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if self.backend == "cuda":
            if not x.is_cuda:
                raise RuntimeError("mamba.backend=cuda needs the model on a CUDA device")
            return True
        return self.backend == "auto" and x.is_cuda and cuda_selective_scan() is not None

    def ssm(self, x: torch.Tensor, suffix: str = "") -> torch.Tensor:
        """One direction on x ``(B, d_inner, L)`` already in its scan order: conv, projections, scan + D skip."""
        L = x.shape[-1]
        x = F.silu(getattr(self, f"conv1d{suffix}")(x)[..., :L])
        dt, B, C = torch.split(getattr(self, f"x_proj{suffix}")(x.transpose(1, 2)),
                               [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_proj = getattr(self, f"dt_proj{suffix}")
        delta = dt_proj.weight @ dt.transpose(1, 2)                       # (B, d_inner, L), bias in the scan
        A = -torch.exp(getattr(self, f"A{suffix}_log").float())
        args = (x, delta, A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                getattr(self, f"D{suffix}").float())
        kw = dict(z=None, delta_bias=dt_proj.bias.float(), delta_softplus=True)
        if self._use_kernel(x):
            return cuda_selective_scan()(*(a.contiguous() for a in args), **kw)
        return selective_scan(*args, **kw, chunk=self.scan_chunk)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int] | None = None,
                cls_index: int | None = None) -> torch.Tensor:
        """``(B, L, d_model)``; ``grid`` (patch rows, cols) and ``cls_index`` place the column scans (4way)."""
        L = hidden_states.shape[1]
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)
        y = 0.0
        orders = scan_orders(self.scan, L, grid, cls_index)
        for suffix, order in orders.items():
            if order is None:
                y = y + self.ssm(x, suffix)
            else:
                order = order.to(x.device)
                y = y + self.ssm(x[..., order], suffix)[..., torch.argsort(order)]
        y = y / len(orders) * F.silu(z)
        return self.out_proj(y.transpose(1, 2))
