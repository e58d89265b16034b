"""Regularization pictures (--reg-dir, --reg-weight) and several resolutions in one run (--resolution 48,64):
what each epoch holds, how reg rows are weighted, the settings, and exact resume with both (issue 19, points 2, 6)."""

import json
import shutil
import types
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.training.config import TrainConfig
from sdlora.training.data import BucketSampler, Item, make_buckets, training_samples
from sdlora.training.loss import training_loss
from sdlora.training.resume import check_resumable, history
from tests.test_training_data import STYLES


def _epoch(sampler, epoch):
    return [i for b in sampler.batches(epoch) for i in b]


def test_each_epoch_adds_one_regularization_sample_per_training_sample_chosen_by_seed_and_epoch():
    train = [(64, 64)] * 5 + [(48, 80)] * 2  # 7 training samples, two buckets
    few = [(64, 64)] * 3  # fewer reg samples than training ones: cycled
    sampler = BucketSampler(train, batch_size=2, seed=4, repeats=2, reg_buckets=few)
    uses = Counter()
    for epoch in range(3):
        batches = sampler.batches(epoch)
        flat = [i for b in batches for i in b]
        assert sorted(i for i in flat if i < 7) == sorted(list(range(7)) * 2)  # each training sample `repeats` times
        reg = [i - 7 for i in flat if i >= 7]
        assert len(reg) == 14  # one reg sample per training sample of the epoch (repeats counted, as kohya does)
        assert max(Counter(reg).values()) - min(Counter(reg).values()) <= 1  # cycled evenly within the epoch
        uses.update(reg)
        all_buckets = train + few
        assert all(len({all_buckets[i] for i in b}) == 1 for b in batches)  # still one bucket per batch
        assert any(min(b) < 7 <= max(b) for b in batches)  # reg rows share batches with training rows
    assert sorted(uses.values()) == [14, 14, 14]  # 42 uses over 3 epochs, even
    many = [(64, 64)] * 10  # more reg samples than one epoch takes: the next epochs take the others
    sampler = BucketSampler(train[:5], batch_size=3, seed=4, reg_buckets=many)
    picks = [sorted(i - 5 for i in _epoch(sampler, e) if i >= 5) for e in range(4)]
    assert all(len(p) == 5 for p in picks) and Counter(sum(picks, [])) == Counter(list(range(10)) * 2)
    # decided by (seed, epoch) alone: a fresh sampler asked for epoch 3 first (as a resumed run is) agrees
    fresh = BucketSampler(train[:5], batch_size=3, seed=4, reg_buckets=many)
    assert fresh.batches(3) == sampler.batches(3) and fresh.batches(2) == sampler.batches(2)
    other = BucketSampler(train[:5], batch_size=3, seed=5, reg_buckets=many)
    assert [other.reg_picks(e) for e in range(4)] != [sampler.reg_picks(e) for e in range(4)]
    assert BucketSampler(train, 2, 4, 2).batches(1) == BucketSampler(train, 2, 4, 2, reg_buckets=()).batches(1)


def test_several_resolutions_put_each_picture_once_per_resolution_in_every_epoch(tmp_path):
    items = [Item(tmp_path / f"{k}.png", "x", size) for k, size in enumerate([(64, 64), (128, 64), (64, 128)])]
    regs = [Item(tmp_path / "r.png", "y", (64, 64))]
    sets = [make_buckets(48, 16, max_side=96), make_buckets(64, 16, max_side=128)]
    samples = training_samples(items, regs, sets)
    assert [(s.item, s.reg) for s in samples] == [(i, False) for i in items] * 2 + [(regs[0], True)] * 2
    for r, side in enumerate((48, 64)):
        square, wide, tall = (s.bucket for s in samples[3 * r : 3 * r + 3])
        assert square == (side, side) and wide[0] > wide[1] and tall == wide[::-1]  # each in its resolution's set
        assert all(w * h <= side * side for w, h in (square, wide, tall))
    sampler = BucketSampler([s.bucket for s in samples[:6]], 2, 0, reg_buckets=[s.bucket for s in samples[6:]])
    for epoch in range(2):
        batches = sampler.batches(epoch)
        flat = [i for b in batches for i in b]
        assert sorted(i for i in flat if i < 6) == list(range(6))  # (picture, resolution) pairs, each once
        assert Counter(i for i in flat if i >= 6) == {6: 3, 7: 3}  # the reg picture at each resolution, in turn
        assert all(len({samples[i].bucket for i in b}) == 1 for b in batches)


def test_resolution_and_reg_settings_from_toml_and_flags(tmp_path):
    toml = tmp_path / "t.toml"
    for text, want in (("[48, 64]", (48, 64)), ("64", (64,))):
        toml.write_text(f'data_dir = "d"\nout_dir = "o"\nresolution = {text}\nreg_dir = "r"\nreg_weight = 0.25\n')
        cfg = TrainConfig.load(toml)
        assert (cfg.resolution, cfg.reg_dir, cfg.reg_weight) == (want, "r", 0.25)
    toml.write_text('data_dir = "d"\nout_dir = "o"\nresolution = "48,64"\n')
    with pytest.raises(SdloraError, match="resolution = '48,64' must be a whole number or a list of them"):
        TrainConfig.load(toml)
    with pytest.raises(SdloraError, match="resolution = \\(48, 60\\) must be multiples of 8, each once"):
        TrainConfig(data_dir="d", out_dir="o", resolution=[48, 60])
    with pytest.raises(SdloraError, match="reg_weight = -1.0 must be 0 or more"):
        TrainConfig(data_dir="d", out_dir="o", reg_weight=-1.0)
    from sdlora.cli import build_parser

    args = build_parser().parse_args(["train", "d", "--out", "o", "--resolution", "48,64", "--reg-dir", "r"])
    assert (args.resolution, args.reg_dir) == ((48, 64), "r")
    assert build_parser().parse_args(["train", "d", "--out", "o", "--resolution", "64"]).resolution == (64,)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "d", "--out", "o", "--resolution", "48x64"])


def test_reg_rows_loss_is_multiplied_by_reg_weight_and_averaged_over_the_whole_batch():
    torch.manual_seed(0)
    alphas = torch.linspace(0.99, 0.01, 100)
    sched = types.SimpleNamespace(config=types.SimpleNamespace(prediction_type="epsilon"), alphas_cumprod=alphas,
                                  add_noise=lambda x, n, t: alphas[t].sqrt()[:, None, None, None] * x
                                  + (1 - alphas[t]).sqrt()[:, None, None, None] * n)
    w = torch.nn.Parameter(torch.tensor(0.3))
    unet = lambda x, t, **kw: types.SimpleNamespace(sample=w * x)  # noqa: E731  a one-parameter "UNet"
    lat, noise, t = torch.randn(4, 4, 6, 6), torch.randn(4, 4, 6, 6), torch.tensor([5, 30, 60, 90])
    rows = torch.tensor([1.0, 0.25, 1.0, 0.25])  # rows 1 and 3 are regularization rows at --reg-weight 0.25
    loss = training_loss(unet, sched, lat, noise, t, {}, 5.0, None, rows)
    # the reference, from the formula: mean over all 4 rows of row weight x min-SNR weight x that row's MSE
    snr = alphas[t] / (1 - alphas[t])
    noisy = sched.add_noise(lat, noise, t)
    mse = ((0.3 * noisy - noise) ** 2).mean(dim=(1, 2, 3))
    assert loss.item() == pytest.approx((rows * torch.clamp(snr, max=5.0) / snr * mse).mean().item(), rel=1e-6)
    # reg_weight 0: the gradient is the training rows' alone (their share of the 4-row mean)
    grad = torch.autograd.grad(training_loss(unet, sched, lat, noise, t, {}, 5.0, None, torch.tensor([1., 0, 1, 0])), w)
    kept = torch.autograd.grad(training_loss(unet, sched, lat[::2], noise[::2], t[::2], {}, 5.0) * 2 / 4, w)
    assert torch.allclose(grad[0], kept[0], rtol=1e-6) and grad[0].abs() > 0


def test_resume_refuses_other_reg_pictures_and_other_resolutions(tmp_path):
    from sdlora.training.data import preflight

    items = preflight(STYLES / "dots")[:3]
    reg = tmp_path / "reg"
    reg.mkdir()
    for p in sorted((STYLES / "stripes").glob("00[0-2].*")):
        shutil.copy(p, reg / p.name)
    regs = preflight(reg)
    cfg = TrainConfig(data_dir=str(STYLES / "dots"), out_dir="o", resolution=(48, 64), reg_dir=str(reg))
    state = json.loads(json.dumps(history(cfg, items, [], [], [], regs)))  # as state.json keeps it
    check_resumable(cfg, state, items, Path("step-00000004"), regs)  # the same: fine
    with pytest.raises(SdloraError, match="the regularization pictures in .* are not those step-00000004 was "
                                          "trained on \\(0 new or changed, 1 gone\\)"):
        check_resumable(cfg, state, items, Path("step-00000004"), regs[:2])
    for change, named in (({"resolution": 64}, "resolution \\[48, 64\\] -> \\(64,\\)"),
                          ({"reg_weight": 0.5}, "reg_weight 1.0 -> 0.5")):
        with pytest.raises(SdloraError, match=f"trained with other settings: {named}"):
            check_resumable(replace(cfg, **change), state, items, Path("step-00000004"), regs)
    old = {**state, "config": {**state["config"], "resolution": 64}}  # a checkpoint from before lists
    check_resumable(replace(cfg, resolution=64), old, items, Path("step-00000004"), regs)


@pytest.mark.slow
def test_a_reg_and_two_resolution_run_weights_reg_rows_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """2 pictures at 48 and 64 px plus 3 reg pictures (6 reg samples): 4 training and 4 reg samples per epoch, in
    4 batches of 2, so epoch 1 takes the reg samples epoch 0 left and then a new round; 6 steps cross into it; the
    run resumed from step 3 ends with the uninterrupted adapter."""
    from safetensors.torch import load_file

    import sdlora.training.loop as loop

    data, reg = tmp_path / "data", tmp_path / "reg"
    data.mkdir(), reg.mkdir()
    for p in sorted((STYLES / "dots").glob("00[0-1].*")):
        shutil.copy(p, data / p.name)
    for k in range(3):
        shutil.copy(STYLES / "stripes" / f"00{k}.png", reg / f"r{k}.png")
        (reg / f"r{k}.txt").write_text("a shape, stripes")
    cfg = TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "out"), rank=2, steps=6, batch_size=2, seed=1,
                      text_encoder=False, trigger="zdots", caption_dropout=0.0, validation_split=0.0,
                      resolution=(48, 64), reg_dir=str(reg), reg_weight=0.3, checkpoint_every=3, keep_checkpoints=1)
    seen = []  # per batch: (samples, captions, row weights)
    real_batch_loss, real_loss, real_caption = loop._batch_loss, loop.training_loss, loop.process_caption

    def batch_loss(run, batch):
        seen.append([[run.samples[i] for i in batch], [], None])
        return real_batch_loss(run, batch)

    def caption(*a, **kw):
        seen[-1][1].append(out := real_caption(*a, **kw))
        return out

    def loss(*a, **kw):
        seen[-1][2] = a[-1].tolist()  # row weights, the last positional argument
        return real_loss(*a, **kw)

    monkeypatch.setattr(loop, "_batch_loss", batch_loss)
    monkeypatch.setattr(loop, "process_caption", caption)
    monkeypatch.setattr(loop, "training_loss", loss)
    straight = load_file(str(loop.train(cfg, progress=False).adapter))
    first_epoch = [(s.item.image.name, s.bucket, s.reg) for samples, _, _ in seen[:4] for s in samples]
    assert sorted(first_epoch)[:4] == [("000.png", (48, 48), False), ("000.png", (64, 64), False),
                                       ("001.png", (48, 48), False), ("001.png", (64, 64), False)]
    reg_rows = sorted(first_epoch)[4:]  # one per training sample, none twice (6 to choose from)
    assert len(reg_rows) == 4 == len(set(reg_rows)) and all(r[0].startswith("r") and r[1][0] in (48, 64) for r in reg_rows)
    for samples, captions, weights in seen:
        assert len({s.bucket for s in samples}) == 1
        assert weights == [pytest.approx(0.3) if s.reg else 1.0 for s in samples]
        assert all(("zdots" in c) != s.reg for s, c in zip(samples, captions))  # no trigger on reg captions
    monkeypatch.undo()
    (tmp_path / "out" / "adapter.safetensors").unlink()  # the step-3 checkpoint alone is left (keep 1)
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step-00000003"]
    resumed = load_file(str(loop.train(replace(cfg, resume=True), progress=False).adapter))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
