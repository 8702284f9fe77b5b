"""A tiny DDP training run for tests/test_distributed.py (not a test itself).

    torchrun --standalone --nproc_per_node=2 tests/ddp_script.py OUT      # DDP, gloo
    python tests/ddp_script.py OUT --single                               # one process, same global batches

Trains an MLP for 2 epochs with SGD + momentum on 64 fixed examples (global batch 16 = 2 ranks x 8), saving a
checkpoint after epoch 1 (rank 0 only), then every rank rebuilds the model, resumes from the checkpoint rank 0 picked,
re-trains epoch 2 and checks it lands on the same weights. Rank 0 gathers every rank's final parameters and writes
OUT/result.pt. An audit hook records every file each rank writes under OUT, so the test can check that only rank 0
wrote.
"""
import json, os, sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hjepa.checkpoint import CheckpointManager
from hjepa.data import build_loader, set_epoch
from hjepa.distributed import (any_rank, cleanup_distributed, get_rank, get_world_size, is_dist, load_latest_synced,
                               main_process_only, reduce_metrics, save_on_main, setup_distributed, shard_indices,
                               wrap_ddp)

GLOBAL_BATCH, EPOCHS, N = 16, 2, 64
WRITES = []   # (event, path) of every write this process makes under OUT, recorded by an audit hook


def audit_writes(out):
    out = str(Path(out).resolve())
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == 'open':
            path, mode, flags = args
            writing = ((isinstance(mode, str) and any(c in mode for c in 'wax+'))
                       or (isinstance(flags, int) and flags & wflags))
            paths = [path] if writing else []
        elif event in ('os.rename', 'os.link', 'os.symlink'): paths = [args[1]]
        elif event in ('os.remove', 'os.mkdir', 'os.rmdir', 'os.truncate'): paths = [args[0]]
        else: return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(p)).startswith(out):
                WRITES.append((event, os.path.relpath(os.path.abspath(os.fsdecode(p)), out)))
    sys.addaudithook(hook)


def data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N, 8, generator=g)
    y = (x[:, :2].sum(1, keepdim=True) > 0).float() + 0.1 * torch.randn(N, 1, generator=g)
    return TensorDataset(x, y)


def make_model():
    torch.manual_seed(rank_init_seed())
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def rank_init_seed():
    # different init on each rank on purpose: DDP must broadcast rank 0's weights when it wraps the model
    return 0 if get_rank() == 0 else 1000 + get_rank()


def loader(ds, epoch, single):
    if single:   # one process: DistributedSampler's order for world size 1, whole global batch
        return DataLoader(ds, batch_size=GLOBAL_BATCH, sampler=shard_indices(len(ds), 0, 1, seed=0, epoch=epoch))
    dl = build_loader(ds, batch_size=GLOBAL_BATCH // get_world_size(), seed=0)   # a DistributedSampler under DDP
    set_epoch(dl, epoch)
    return dl


def run_epoch(model, opt, ds, epoch, single):
    losses = []
    for xb, yb in loader(ds, epoch, single):
        loss = nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    return reduce_metrics({'loss': sum(losses) / len(losses), 'steps': float(len(losses))})


def collectives():
    "The rank helpers of hjepa.core (re-exported by hjepa.distributed) on per-rank values: rank r holds r + 1."
    r = get_rank()
    return {'mean': reduce_metrics({'x': r + 1.0, 'y': 10.0 * (r + 1)}),
            'weighted': reduce_metrics({'x': r + 1.0}, weight=r + 1),          # (1*1 + 2*2) / (1 + 2) on 2 ranks
            'sum': reduce_metrics({'n': r + 1.0}, op='sum'),
            'max': reduce_metrics({'g': r + 1.0}, op='max'),
            'vote_last': any_rank(r == get_world_size() - 1),                  # true on one rank only
            'vote_none': any_rank(False)}


def flat(model):
    m = model.module if hasattr(model, 'module') else model
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def main(out, single):
    info = setup_distributed()
    assert single or info.distributed, "run me under torchrun (or with --single)"
    out = Path(out); rank = get_rank()
    ds = data()
    model = wrap_ddp(make_model(), info)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mgr = CheckpointManager(out / 'ckpt') if rank == 0 else None
    history = []
    for epoch in range(EPOCHS):
        history.append(run_epoch(model, opt, ds, epoch, single))
        if epoch == 0:   # checkpoint after epoch 1: rank 0 writes, everyone waits
            if rank == 0:
                mgr.save({'model': (model.module if is_dist() else model).state_dict(), 'opt': opt.state_dict()},
                         step=1)
            save_on_main({'epoch': epoch, 'history': history}, out / 'epoch0.pt')
    final = flat(model)
    coll = collectives()

    # resume: a fresh model and optimiser on every rank, loaded from the file rank 0 picked, then epoch 2 again
    ck = load_latest_synced(mgr if rank == 0 else CheckpointManagerStub())
    model2 = make_model(); model2.load_state_dict(ck['state']['model'])
    model2 = wrap_ddp(model2, info)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9); opt2.load_state_dict(ck['state']['opt'])
    run_epoch(model2, opt2, ds, 1, single)
    resumed = flat(model2)

    gathered = [torch.zeros_like(final) for _ in range(get_world_size())] if is_dist() else [final]
    gathered_resumed = [torch.zeros_like(resumed) for _ in range(get_world_size())] if is_dist() else [resumed]
    writes = [None] * get_world_size() if is_dist() else [list(WRITES)]
    if is_dist():
        torch.distributed.all_gather(gathered, final)
        torch.distributed.all_gather(gathered_resumed, resumed)
        torch.distributed.all_gather_object(writes, list(WRITES))   # which files each rank wrote so far
    write_result(out, {'final': gathered, 'resumed': gathered_resumed, 'history': history,
                       'world_size': get_world_size(), 'resume_step': ck['step'], 'writes': writes,
                       'collectives': coll})
    cleanup_distributed()


class CheckpointManagerStub:
    "Ranks other than 0 never touch the checkpoint folder: load_latest_synced only calls the manager on rank 0."
    def __getattr__(self, name): raise AssertionError(f"rank {get_rank()} used the checkpoint manager ({name})")


@main_process_only
def write_result(out, result):
    torch.save(result, out / 'result.pt')
    (out / 'done.json').write_text(json.dumps({'rank': get_rank(), 'pid': os.getpid()}))


if __name__ == '__main__':
    torch.set_num_threads(1)
    audit_writes(sys.argv[1])
    main(sys.argv[1], '--single' in sys.argv)
