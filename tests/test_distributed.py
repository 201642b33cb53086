"""Data-parallel training: 2 CPU processes (gloo) give the loss and weights of one process on the same
global batches, with uneven shards, token-weighted losses and gradient accumulation."""

import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from amrg import dist
from amrg.train import LoopConfig, fit, shard

N, L = 61, 6  # 61 rows: the last batch of 8 has 5 rows, split 3 / 2 across two ranks


def _problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, L, 5, generator=g), torch.randn(N, L, 1, generator=g)
    lengths = torch.randint(1, L + 1, (N,), generator=g)  # "tokens" per row differ
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def loss(net, b):
        err = (net(x[b]) - y[b]).squeeze(-1).square() * mask[b]
        return err.sum() / mask[b].sum(), int(mask[b].sum())  # token mean, token count

    def val():
        with torch.no_grad():
            return {"val_loss": float(((model(x) - y).squeeze(-1).square() * mask).sum() / mask.sum())}

    return model, loss, val


CFG = LoopConfig(epochs=3, batch_size=8, lr=0.05, warmup_steps=2, grad_accum=2, checkpoint_every=1000, seed=1)


def _worker(rank, world, init_file, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, loss, val = _problem()
    fitted = fit(model, N, loss, val, CFG, out_dir / "state.pt", "fp")
    torch.save({"best": fitted.best_state, "history": fitted.history}, out_dir / f"rank{rank}.pt")
    dist.shutdown()


def test_shard_splits_a_global_batch_across_ranks():
    b = torch.arange(5)
    assert [shard(b, dist.Context(r, 2))[0].tolist() for r in range(2)] == [[0, 1, 2], [3, 4]]
    local, real = shard(torch.arange(1), dist.Context(1, 2))
    assert local.tolist() == [0] and not real  # borrowed item, weighted 0


@pytest.mark.timeout(300)
def test_two_gloo_processes_match_one_process(tmp_path):
    model, loss, val = _problem()
    ref = fit(model, N, loss, val, CFG, tmp_path / "ref.pt", "fp")
    ref_best, ref_hist = ref.best_state, ref.history

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), tmp_path), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
        for got, want in zip(out["history"], ref_hist):
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
            assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
        for k in ref_best:
            torch.testing.assert_close(out["best"][k], ref_best[k], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "state.pt").exists()  # rank 0 consumed its checkpoint


def test_relaunch_is_a_no_op_for_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.relaunch(1, "stages.train_generator", []) is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # already under a launcher: run in this process
    assert dist.launched() and dist.relaunch(2, "stages.train_generator", []) is None
