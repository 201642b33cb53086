"""Hopfield retrieval against the reference formulas of hflayers (ml-jku/hopfield-layers, the layer the
released AM-MRG code runs): LayerNorms on state / stored / projected patterns, per-head projections,
softmax(scaling · q kᵀ), association dropout, heads concatenated, output projection. Also: the two
scaling conventions, one temperature for the descent and the read-out, the top-k path with every option,
and the default config reproducing the old one-head formula bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amrg.config import BankIndex, Hopfield, Llm, ParamsError, parse_params
from amrg.models.generator import GeneratorSpec
from amrg.models.hopfield import HopfieldRetrieval, hopfield_descent, hopfield_energy, hopfield_scores


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random (LayerNorm gains and biases too, so the affine parts count)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _layer_norm(x, gain, bias, eps=1e-5):
    """hflayers' LayerNorm (nn.LayerNorm): biased variance over the last axis, affine."""
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gain + bias


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _hflayers_reference(h: HopfieldRetrieval, state: np.ndarray, scaling: float) -> np.ndarray:
    """HopfieldLayer(scaling=…, normalize_{state,stored}_pattern=True, normalize_pattern_projection=True,
    update_steps_max=0) in numpy, from hflayers' formulas: LayerNorm each input, project, per head
    softmax(scaling · q_h k_hᵀ) · v_h, concatenate the heads, output projection."""
    mem = _np(h.memory)
    lin = lambda x, m: x @ _np(m.weight).T + _np(m.bias)  # noqa: E731
    ln = lambda x, m: _layer_norm(x, _np(m.weight), _np(m.bias))  # noqa: E731
    q = lin(ln(state, h.norm_state), h.q_proj)
    k = lin(ln(mem, h.norm_stored), h.k_proj)
    v = lin(ln(mem, h.norm_projection), h.v_proj)
    d, dv = q.shape[-1] // h.heads, v.shape[-1] // h.heads
    heads = [_softmax((scaling * q[..., i * d:(i + 1) * d]) @ k[:, i * d:(i + 1) * d].T) @ v[:, i * dv:(i + 1) * dv]
             for i in range(h.heads)]
    return lin(np.concatenate(heads, -1), h.out_proj)


def test_matches_hflayers_formulas_on_a_small_case():
    # 2 queries, 5 stored patterns of width 4, 2 heads of width 3, state width 3, output width 4
    torch.manual_seed(0)
    h = _randomise(HopfieldRetrieval(query_dim=3, memory=torch.randn(5, 4), hidden_dim=3, out_dim=4, beta=0.7,
                                     scaling="beta", normalize=True, heads=2)).eval()
    state = torch.randn(1, 2, 3)
    want = _hflayers_reference(h, _np(state), scaling=0.7)
    assert want.shape == (1, 2, 4)
    np.testing.assert_allclose(_np(h(state)), want, rtol=1e-5, atol=1e-5)
    # hflayers' default scaling (None) is 1/√head_dim: our beta_over_sqrt_d with β = 1
    h.scaling, h.beta = "beta_over_sqrt_d", 1.0
    np.testing.assert_allclose(_np(h(state)), _hflayers_reference(h, _np(state), 1 / math.sqrt(3)), rtol=1e-5, atol=1e-5)


def test_released_profile_builds_the_released_layer_shape():
    cfg = Hopfield(dim=8, scaling="beta", normalize=True, heads=6, dropout=0.1)
    h = HopfieldRetrieval.from_config(cfg, query_dim=5, memory=torch.randn(7, 6), out_dim=10)
    shapes = {n: tuple(p.shape) for n, p in h.named_parameters()}
    assert shapes == {"q_proj.weight": (48, 5), "q_proj.bias": (48,), "k_proj.weight": (48, 6), "k_proj.bias": (48,),
                      "v_proj.weight": (48, 6), "v_proj.bias": (48,), "out_proj.weight": (10, 48),
                      "out_proj.bias": (10,), "norm_state.weight": (5,), "norm_state.bias": (5,),
                      "norm_stored.weight": (6,), "norm_stored.bias": (6,), "norm_projection.weight": (6,),
                      "norm_projection.bias": (6,)}
    assert (h.beta, h.scaling, h.heads, h.dropout, h.steps) == (4.0, "beta", 6, 0.1, 1)
    assert h(torch.randn(2, 3, 5)).shape == (2, 3, 10)


def test_scaling_beta_with_large_beta_returns_the_nearest_patterns_value():
    torch.manual_seed(2)
    d = 16
    mem = torch.nn.functional.normalize(torch.randn(20, d), dim=-1)
    h = HopfieldRetrieval(query_dim=d, memory=mem, hidden_dim=d, out_dim=5, beta=60.0, scaling="beta")
    with torch.no_grad():  # identity q/k maps: the scores are the raw inner products with the bank
        for m in (h.q_proj, h.k_proj):
            m.weight.copy_(torch.eye(d)), m.bias.zero_()
    q = (mem[[7, 3]] + 0.05 * torch.randn(2, d))[None]
    torch.testing.assert_close(h(q)[0], h.v_proj(mem[[7, 3]]), rtol=1e-4, atol=1e-5)
    # the same β read as β/√d (the old convention) is 4x cooler here (β/√16): not yet the nearest value
    h.scaling = "beta_over_sqrt_d"
    assert not torch.allclose(h(q)[0], h.v_proj(mem[[7, 3]]), rtol=1e-4, atol=1e-5)


def test_beta_over_sqrt_d_is_scaling_beta_at_beta_over_sqrt_d():
    torch.manual_seed(3)
    xi, keys = torch.randn(4, 6), torch.randn(9, 6)
    torch.testing.assert_close(hopfield_scores(xi, keys, scaling="beta_over_sqrt_d"),
                               hopfield_scores(xi, keys, scaling="beta") / math.sqrt(6))
    for heads, steps in ((1, 1), (2, 3)):
        torch.manual_seed(4)
        old = HopfieldRetrieval(5, torch.randn(11, 7), 6, 3, beta=4.0, steps=steps, heads=heads)
        new = HopfieldRetrieval(5, old.memory, 6, 3, beta=4.0 / math.sqrt(6), steps=steps, heads=heads, scaling="beta")
        new.load_state_dict(old.state_dict())
        q = torch.randn(2, 14, 5)
        torch.testing.assert_close(new(q), old(q), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scaling", ["beta_over_sqrt_d", "beta"])
@pytest.mark.parametrize("masked", [False, True])
def test_descent_steps_along_the_energy_gradient_at_the_readout_temperature(scaling, masked):
    torch.manual_seed(5)
    xi0, keys, beta, eta = torch.randn(3, 8), torch.randn(30, 8), 2.5, 0.01
    mask = (torch.rand(3, 30) < 0.6) | (torch.arange(30) == 0) if masked else None
    xi = (xi0 + 0.3 * torch.randn(3, 8)).requires_grad_()
    hopfield_energy(xi, xi0, keys, beta, mask, scaling).sum().backward()
    # one analytic step from ξ: ξ' = ξ - η ∇E(ξ); hopfield_descent starts at ξ₀, so run it from ξ with
    # the anchor term taken out and put back by hand
    step = hopfield_descent(xi.detach(), keys, beta, eta, 1, mask, scaling)
    analytic = (xi.detach() - step) / eta + 2 * (xi.detach() - xi0)
    torch.testing.assert_close(analytic, xi.grad, rtol=1e-4, atol=1e-5)
    # the energy's β is the read-out's: a different β in the descent would not match autograd here
    other = (xi.detach() - hopfield_descent(xi.detach(), keys, 2 * beta, eta, 1, mask, scaling)) / eta
    assert not torch.allclose(other + 2 * (xi.detach() - xi0), xi.grad, rtol=1e-3, atol=1e-4)


def test_module_descent_and_readout_by_hand():
    torch.manual_seed(6)
    h = HopfieldRetrieval(4, torch.randn(12, 5), 3, 2, beta=3.0, steps=2, eta=0.2, scaling="beta", heads=2)
    q = torch.randn(1, 3, 4)
    xi0, keys, values = h.q_proj(q), h.k_proj(h.memory), h.v_proj(h.memory)
    out = []
    for i in range(2):
        x0, k, v = xi0[..., 3 * i:3 * i + 3], keys[:, 3 * i:3 * i + 3], values[:, 3 * i:3 * i + 3]
        x1 = x0 + 0.2 * torch.softmax(3.0 * x0 @ k.T, -1) @ k  # ξ₁ = ξ₀ - η(2(ξ₀-ξ₀) - α(ξ₀)K)
        out.append(torch.softmax(3.0 * x1 @ k.T, -1) @ v)
    torch.testing.assert_close(h(q), h.out_proj(torch.cat(out, -1)))


def test_association_dropout_in_training_only():
    n, p = 6, 0.5
    h = HopfieldRetrieval(3, torch.eye(n), 4, n, beta=1.0, dropout=p)
    with torch.no_grad():  # values = identity: the output rows are the association weights themselves
        h.v_proj.weight.copy_(torch.eye(n)), h.v_proj.bias.zero_()
    q = torch.randn(2, 50, 3)
    alpha = h.eval()(q)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 50))
    h.train()
    torch.manual_seed(7)
    dropped = h(q)
    zero = dropped == 0
    assert 0.3 < zero.float().mean() < 0.7
    torch.testing.assert_close(dropped[~zero], alpha[~zero] / (1 - p))
    assert not torch.equal(h(q), dropped)  # a fresh draw per forward
    # eval is exactly the dropout-free module, and dropout 0 draws no random numbers in training
    h0 = HopfieldRetrieval(3, torch.eye(n), 4, n, beta=1.0)
    h0.load_state_dict(h.state_dict())
    assert torch.equal(h.eval()(q), h0.eval()(q))
    rng = torch.get_rng_state()
    h0.train()(q)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("heads,normalize,scaling,steps", [(2, True, "beta", 1), (3, True, "beta_over_sqrt_d", 3),
                                                          (1, True, "beta", 2), (2, False, "beta", 1)])
def test_top_k_covering_the_bank_equals_dense_with_every_option(heads, normalize, scaling, steps):
    pytest.importorskip("faiss")
    torch.manual_seed(8)
    h = _randomise(HopfieldRetrieval(7, torch.randn(30, 12), 4, 5, beta=0.5, steps=steps, eta=0.05, scaling=scaling,
                                     normalize=normalize, heads=heads))
    q = torch.randn(2, 14, 7)
    dense = h(q)
    h.top_k = 30  # force the indexed path with every row a candidate
    torch.testing.assert_close(h(q), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_candidates_are_each_heads_dense_top_k(normalize):
    pytest.importorskip("faiss")
    torch.manual_seed(9)
    h = _randomise(HopfieldRetrieval(7, torch.randn(40, 12), 4, 5, top_k=6, normalize=normalize, heads=3))
    q = torch.randn(2, 5, 7)
    xi0 = h.q_proj(h.norm_state(q)).unflatten(-1, (3, 4))
    keys = h.k_proj(h.norm_stored(h.memory)).unflatten(-1, (3, 4))
    want = torch.einsum("bqhd,nhd->bqhn", xi0, keys).topk(6, dim=-1).indices.sort(-1).values
    got = h.candidates(xi0.flatten(-2))
    assert got.shape == (2, 5, 3, 6)
    assert torch.equal(got.sort(-1).values, want)


def test_default_config_is_the_old_formula_bit_for_bit():
    query_dim, width, out_dim = 5, 6, 3
    cfg = Hopfield(dim=4)
    torch.manual_seed(10)
    mem = torch.randn(9, width)
    torch.manual_seed(11)
    h = HopfieldRetrieval.from_config(cfg, query_dim=query_dim, memory=mem, out_dim=out_dim).train()
    torch.manual_seed(11)  # the old module drew q, k, v in this order, nothing else
    q_proj, k_proj, v_proj = torch.nn.Linear(query_dim, 4), torch.nn.Linear(width, 4), torch.nn.Linear(width, out_dim)
    old = {f"{n}.{k}": v for n, m in (("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj))
           for k, v in m.state_dict().items()}
    assert h.state_dict().keys() == old.keys()
    assert all(torch.equal(h.state_dict()[k], v) for k, v in old.items())
    q = torch.randn(2, 14, query_dim)
    want = torch.softmax(4.0 * (q_proj(q) @ k_proj(mem).T) / math.sqrt(4), dim=-1) @ v_proj(mem)
    assert torch.equal(h(q), want)


def test_config_checks_and_old_saved_specs_load():
    assert Hopfield().check() == []
    assert len(Hopfield(heads=0, dropout=1.0).check()) == 2
    assert len(Hopfield(dropout=-0.1).check()) == 1
    with pytest.raises(ParamsError, match="hopfield.scaling"):
        parse_params({"hopfield": {"scaling": "inv_sqrt_d"}})
    released = parse_params({"hopfield": {"scaling": "beta", "normalize": True, "heads": 6, "dropout": 0.1}}).hopfield
    assert (released.scaling, released.normalize, released.heads, released.dropout) == ("beta", True, 6, 0.1)
    # a config.json written before these keys existed rebuilds today's module
    spec = GeneratorSpec(Llm(), Hopfield(dim=8), BankIndex(), "go", 1, 16, 8)
    d = spec.to_dict()
    for k in ("scaling", "normalize", "heads", "dropout"):
        del d["hopfield"][k]
    assert GeneratorSpec.from_dict(d).hopfield == Hopfield(dim=8)


def test_generator_builds_both_memories_from_the_hopfield_section():
    from tests.test_training import TINY_LLM, make_generator

    cfg = Hopfield(dim=4, beta=2.0, scaling="beta", normalize=True, heads=2, dropout=0.1)
    torch.manual_seed(12)
    model = make_generator(Llm(**TINY_LLM), torch.randn(6, 10), torch.randn(5, 12), cfg, query_dim=16,
                           texts=["the heart is normal ."] * 2)
    for h, width in ((model.v_hopfield, 10), (model.r_hopfield, 12)):
        assert (h.beta, h.scaling, h.normalize, h.heads, h.dropout) == (2.0, "beta", True, 2, 0.1)
        assert h.k_proj.weight.shape == (8, width) and h.out_proj.weight.shape == (32, 8)
    assert model.v_hopfield(torch.randn(2, 14, 16)).shape == (2, 14, 32)


@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("steps", [1, 3])
def test_association_weights_read_out_the_forward_output(top_k, steps):
    """``association`` (what serve shows as the retrieved bank rows) is the α the forward reads out with:
    α·V over its rows equals the module's output, dense and with a top-k restriction."""
    torch.manual_seed(3)
    mem = torch.randn(40, 12)
    h = HopfieldRetrieval(6, mem, hidden_dim=8, out_dim=5, beta=2.0, steps=steps, top_k=top_k).eval()
    q = torch.randn(2, 3, 6)
    alpha, ids = h.association(q)
    assert alpha.shape == (2, 3, len(ids)) and torch.allclose(alpha.sum(-1), torch.ones(2, 3))
    values = h.v_proj(h.norm_projection(mem[ids]))
    torch.testing.assert_close(alpha @ values, h(q).detach())
    if top_k:
        assert ((alpha > 0).sum(-1) <= top_k).all()  # each query weighs only its own k rows
