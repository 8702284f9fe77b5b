"""The real `hjepa.trainer.Trainer` under torchrun, for tests/test_distributed.py (not a test itself).

    torchrun --standalone --nproc_per_node=2 tests/ddp_trainer_script.py OUT STEPS

A tiny H-JEPA (nano ViT, 2 levels) on 32 synthetic 32-px images, per-rank batch 4, no AMP, checkpoints every 2 steps.
Then a second Trainer on every rank resumes from the step-2 checkpoint (copied by rank 0 into OUT/resume) and
trains to STEPS again. Rank 0 gathers every rank's full model state (context + EMA target + predictor + heads) of
both runs and the files each rank wrote (an audit hook), and writes OUT/result_STEPS.pt.
"""
import shutil, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_script import WRITES, audit_writes
from hjepa.data import build_loader, load_dataset
from hjepa.distributed import (barrier, cleanup_distributed, get_world_size, is_main_process, rank_seed,
                               setup_distributed, wrap_ddp)
from hjepa.masking import HierarchicalMaskGenerator, MaskCollator, preset_8x8
from hjepa.model import HJEPA
from hjepa.trainer import Trainer


def build(out, steps):
    torch.manual_seed(0)
    model = wrap_ddp(HJEPA.from_preset('nano', num_levels=2), setup_distributed())
    ds = load_dataset('synthetic', 'train', n=32)
    gen = HierarchicalMaskGenerator(num_levels=2, **preset_8x8(2))
    dl = build_loader(ds, batch_size=4, seed=0, drop_last=True, collate_fn=MaskCollator(gen, seed=rank_seed(0)))
    return Trainer(model, dl, max_steps=steps, total_steps=8, lr=1e-3, amp='off', out_dir=out, ckpt_every=2,
                   log_every=1, collapse_every=2, seed=0)


def gather(tr):
    flat = torch.cat([v.detach().float().flatten() for v in tr.module.state_dict().values()])
    every = [torch.zeros_like(flat) for _ in range(get_world_size())]
    torch.distributed.all_gather(every, flat)
    return every


def main(out, steps):
    setup_distributed()
    out = Path(out)
    tr = build(out, steps)
    tr.fit()
    params = gather(tr)
    # resume: rank 0 seeds a second run folder with the step-2 checkpoint; every rank resumes from it and finishes
    if is_main_process():
        (out / 'resume' / 'checkpoints').mkdir(parents=True)
        shutil.copyfile(out / 'checkpoints' / 'step_00000002.pt', out / 'resume' / 'checkpoints' / 'step_00000002.pt')
    barrier()
    tr2 = build(out / 'resume', steps)
    resumed_from = tr2.resume()
    tr2.fit()
    resumed = gather(tr2)
    writes = [None] * get_world_size()
    torch.distributed.all_gather_object(writes, list(WRITES))
    if is_main_process():
        torch.save({'params': params, 'resumed': resumed, 'resumed_from': resumed_from, 'resumed_step': tr2.step,
                    'writes': writes, 'step': tr.step, 'world_size': get_world_size()}, out / f'result_{steps}.pt')
    cleanup_distributed()


if __name__ == '__main__':
    torch.set_num_threads(1)
    audit_writes(sys.argv[1])
    main(sys.argv[1], int(sys.argv[2]))
