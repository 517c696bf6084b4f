"""Learning-rate schedules of the training loops."""
import torch

from attnlab.config import Train
from attnlab.training import make_schedule


def _lrs(cfg, steps_per_epoch):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, seen = make_schedule(opt, cfg, steps_per_epoch), []
    for _ in range(cfg.epochs * steps_per_epoch):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_constant_schedule_keeps_the_rate():
    assert _lrs(Train(epochs=3, lr=0.01), 4) == [0.01] * 12


def test_onecycle_warms_up_to_lr_then_decays():
    cfg = Train(epochs=10, lr=0.01, schedule="onecycle", warmup=0.2)
    lrs = _lrs(cfg, 10)                                     # 100 steps, peak after 20% of them
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert abs(peak - 20) <= 1 and abs(lrs[peak] - 0.01) < 1e-6
    assert lrs[0] < 0.001 and lrs[-1] < 1e-4
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:-1], lrs[peak + 1:]))
