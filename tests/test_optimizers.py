"""The optimizers from their own packages (issue 19.3): each gets the LoRA+ groups at their rates, its state
survives a checkpoint bit for bit, a missing package is one clear error; Prodigy takes per-group rates as
multipliers; schedule-free AdamW validates and writes its average x and resumes on its y."""

import random
import shutil
import sys
from dataclasses import replace

import pytest
import torch

from sdlora.adapters.optim import param_groups
from sdlora.errors import SdloraError
from sdlora.mixing import Mix, Mixer
from sdlora.training.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from sdlora.training.optimizers import PACKAGES, make_optimizer, train_mode
from tests.core_helpers import adapted

UPSTREAM = {"adamw": "torch.optim.AdamW", "prodigy": "prodigyopt.Prodigy",
            "adamw_schedulefree": "schedulefree.AdamWScheduleFree",
            "adafactor": "transformers.optimization.Adafactor", "came": "came_pytorch.CAME"}
LR = {"prodigy": 1.0}  # Prodigy's lr multiplies the step it finds


def _upstream(name):
    import importlib

    module, cls = UPSTREAM[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def _model(method="dora"):
    """A two-layer model with adapter 'a' (DoRA: 2-D down/up and a 1-D magnitude, both Adafactor paths)."""
    return adapted("linear", None, {"a": method})


def _loss(model, gen):
    """A loss through adapter 'a' (adapters act only under a mix), on a batch (4, the model's 32 inputs)."""
    with Mixer({"unet": model}).apply(Mix({"a": 1.0}), mode="unfused"):
        return model(torch.randn(4, 32, generator=gen)).pow(2).mean()


def _steps(model, optimizer, schedule, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        _loss(model, gen).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_each_optimizer_is_its_package_class_and_gets_the_loraplus_rates(name):
    _, layers = _model()
    lr = LR.get(name, 1e-3)
    groups = param_groups(layers, "a", lr=lr, loraplus_ratio=16)
    optimizer = make_optimizer(name, groups, torch.device("cpu"))
    assert type(optimizer) is _upstream(name)
    assert [g["lr"] for g in optimizer.param_groups] == [lr, 16 * lr]  # B at ratio x A
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == \
        [[id(p) for p in g["params"]] for g in groups]
    if name == "adafactor":  # a fixed step size under our schedule, not Adafactor's own
        assert not any(optimizer.defaults[k] for k in ("relative_step", "scale_parameter", "warmup_init"))


def test_adamw_steps_over_all_tensors_at_once_and_moves_them_as_the_per_tensor_loop_does():
    """make_optimizer asks torch for its foreach AdamW (one call over a group's tensors; torch picks it by
    itself only on CUDA): it must move the adapter exactly as the per-tensor loop the CPU default runs."""
    runs = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model, layers = _model()
        groups = param_groups(layers, "a", lr=1e-2, loraplus_ratio=4)
        optimizer = (make_optimizer("adamw", groups, torch.device("cpu")) if foreach
                     else torch.optim.AdamW(groups, foreach=False))
        assert optimizer.defaults["foreach"] is foreach
        start = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
        _steps(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), 5, seed=1)
        runs.append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])
        assert not all(torch.equal(a, b) for a, b in zip(start, runs[-1]))  # the steps moved the adapter
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_a_checkpoint_restores_each_optimizer_bit_for_bit(name, tmp_path):
    """3 steps, a checkpoint, then 3 more: a fresh model and optimizer restored from the checkpoint
    (safetensors + state.json) must end on the same bits as the run that went straight on."""

    def build():
        model, layers = _model()
        groups = param_groups(layers, "a", lr=LR.get(name, 1e-3), loraplus_ratio=4)
        optimizer = make_optimizer(name, groups, torch.device("cpu"))
        train_mode(optimizer)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 2))  # a warm-up
        return model, optimizer, schedule

    def adapter(model):
        return {n: p for n, p in model.named_parameters() if ".adapters.a." in n}

    model, optimizer, schedule = build()
    _steps(model, optimizer, schedule, 3, seed=1)
    path = save_checkpoint(tmp_path, 3, adapter(model), optimizer, schedule, torch.Generator(), random.Random(0),
                           {"epoch": 0, "batch": 0}, {"losses": []})
    _steps(model, optimizer, schedule, 3, seed=2)

    again, optimizer2, schedule2 = build()
    tensors, state = load_checkpoint(path)
    with torch.no_grad():
        for n, p in adapter(again).items():
            p.copy_(tensors[f"adapter/{n}"])
    restore_optimizer(optimizer2, tensors, state)
    schedule2.load_state_dict(state["scheduler"])
    _steps(again, optimizer2, schedule2, 3, seed=2)
    assert all(p.grad is None for p in adapter(model).values()) and len(optimizer.state) == len(adapter(model))
    assert all(torch.equal(p, adapter(again)[n]) for n, p in adapter(model).items())


@pytest.mark.parametrize("name", list(PACKAGES))
def test_a_missing_package_is_one_clear_error(name, monkeypatch):
    module, _, package = PACKAGES[name]
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` meets when it is not installed
    _, layers = _model("lora")
    with pytest.raises(SdloraError) as err:
        make_optimizer(name, param_groups(layers, "a", lr=1.0), torch.device("cpu"))
    assert f"needs the {package} package" in err.value.problem and "\n" not in str(err.value)
    assert err.value.fix == f"pip install {package}"


def test_a_missing_package_stops_a_run_before_the_long_part(monkeypatch, tmp_path):
    from sdlora.training.config import TrainConfig
    from sdlora.training.loop import train

    monkeypatch.setitem(sys.modules, "came_pytorch", None)
    monkeypatch.setattr("sdlora.training.setup.load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    cfg = TrainConfig(data_dir=str(tmp_path / "nowhere"), out_dir=str(tmp_path / "out"), optimizer="came")
    with pytest.raises(SdloraError, match="needs the came-pytorch package.*; pip install came-pytorch"):
        train(cfg, progress=False)


def test_optimizer_settings_from_toml_and_schedule_free_takes_a_constant_schedule(tmp_path):
    from sdlora.training.config import TrainConfig

    toml = tmp_path / "train.toml"
    toml.write_text('data_dir = "d"\nout_dir = "o"\noptimizer = "adamw_schedulefree"\nwarmup_steps = 10\n')
    assert TrainConfig.load(toml).optimizer == "adamw_schedulefree"
    with pytest.raises(SdloraError, match="lr_schedule = 'cosine' must be constant with adamw_schedulefree"):
        TrainConfig.load(toml, lr_schedule="cosine")
    with pytest.raises(SdloraError, match="optimizer = 'sgd' must be adamw or .* or came"):
        TrainConfig.load(toml, optimizer="sgd")


def test_prodigy_scales_each_groups_move_by_its_rate_over_the_first():
    """prodigyopt refuses groups at different rates; sdlora steps them all at the first group's rate and
    scales each group's move. On a fresh LoRA (up = 0) the first step moves only up, from exactly 0, so
    LoRA+'s B at ratio 16 must land on 16 x where plain Prodigy puts it."""
    from prodigyopt import Prodigy

    def fresh():
        from sdlora.adapters import AdapterConfig
        from sdlora.inject import add_adapter, wrap
        from tests.core_helpers import base_model

        model = base_model("linear", None)
        layers = wrap(model, ["0", "2"], "unet")
        add_adapter(layers, "a", AdapterConfig(method="lora", rank=4, alpha=8.0, seed=0))
        return model, layers

    def step(model, optimizer):
        _loss(model, torch.Generator().manual_seed(0)).backward()
        optimizer.step()

    ours, layers = fresh()
    groups = param_groups(layers, "a", lr=1.0, loraplus_ratio=16)
    step(ours, make_optimizer("prodigy", groups, torch.device("cpu")))
    plain, plain_layers = fresh()
    with pytest.raises(RuntimeError, match="different lr values"):  # why sdlora wraps it
        step(plain, Prodigy(param_groups(plain_layers, "a", lr=1.0, loraplus_ratio=16), lr=1.0))
    plain, plain_layers = fresh()
    step(plain, Prodigy(param_groups(plain_layers, "a", lr=1.0), lr=1.0))
    a, b = groups
    plain_a, plain_b = param_groups(plain_layers, "a", lr=1.0)
    assert all(torch.equal(p, q) for p, q in zip(a["params"], plain_a["params"]))
    assert all(torch.equal(p, 16 * q) and q.abs().sum() > 0 for p, q in zip(b["params"], plain_b["params"]))
    assert [g["lr"] for g in groups] == [1.0, 16.0]  # the rates are back after the step


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """optimizer -> (config, result) of a 6-step run on 8 pictures with LoRA+, a warm-up, validation and
    checkpoints every 2 steps (each trained once for this module)."""
    from tests.test_training_data import STYLES
    from sdlora.training.config import TrainConfig
    from sdlora.training.loop import train

    root = tmp_path_factory.mktemp("optimizers")
    data = root / "data"
    data.mkdir()
    for p in sorted((STYLES / "dots").glob("*"))[:16]:  # 8 pictures with their captions
        shutil.copy(p, data / p.name)
    runs = {}

    def get(name):
        if name not in runs:
            cfg = TrainConfig(data_dir=str(data), out_dir=str(root / name), rank=4, steps=6, batch_size=2,
                              lr=LR.get(name, 1e-3), seed=3, optimizer=name, loraplus_ratio=4, warmup_steps=2,
                              checkpoint_every=2, keep_checkpoints=3, validation_split=0.25, validate_every=2)
            runs[name] = cfg, train(cfg, progress=False)
        return runs[name]

    return get


def _copy(cfg, to, drop=()):
    """The run's folder copied to `to` without its adapter and the checkpoints named in `drop`."""
    shutil.copytree(cfg.out_dir, to)
    for step in drop:
        shutil.rmtree(to / "checkpoints" / f"step-{step:08d}")
    (to / "adapter.safetensors").unlink()
    return replace(cfg, out_dir=str(to), resume=True)


# Prodigy and schedule-free AdamW run whole (their state lives in param groups and in a second point); Adafactor's
# and CAME's state is restored bit for bit by test_a_checkpoint_restores_each_optimizer_bit_for_bit.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["prodigy", "adamw_schedulefree"])
def test_a_run_resumed_from_a_checkpoint_ends_on_the_same_bits(name, straight, tmp_path):
    """The run resumed from step 2 (as after a kill before step 4's checkpoint) must write the same adapter
    and losses. For schedule-free AdamW that holds only if the checkpoint keeps y and the validations switch
    to x and back."""
    from safetensors.torch import load_file

    from sdlora.training.loop import train

    cfg, result = straight(name)
    resumed = train(_copy(cfg, tmp_path / "killed", drop=[4]), progress=False)
    assert resumed.losses == result.losses
    a, b = load_file(str(result.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_schedule_free_checkpoints_leave_the_run_as_it_is(straight, tmp_path):
    """Checkpoints keep y as it is (no switch to x and back, which rounds): the same run without them writes
    the same bits."""
    from safetensors.torch import load_file

    from sdlora.training.loop import train

    cfg, result = straight("adamw_schedulefree")
    plain = train(replace(cfg, out_dir=str(tmp_path / "plain"), checkpoint_every=0), progress=False)
    a, b = load_file(str(result.adapter)), load_file(str(plain.adapter))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_schedule_free_writes_its_average_x_not_the_training_point_y(straight, tmp_path):
    """x = (y - (1 - beta1) z) / beta1 from the step-4 checkpoint's y and z, computed here; the adapter written
    by a run that ends at that checkpoint must be x (and x is not y)."""
    from safetensors.torch import load_file

    from sdlora.training.loop import _resume, train
    from sdlora.training.setup import setup_run

    at_4 = replace(_copy(straight("adamw_schedulefree")[0], tmp_path / "at4"), steps=4)
    run = setup_run(at_4)
    _resume(run)
    beta1 = run.optimizer.param_groups[0]["betas"][0]
    state = run.optimizer.optimizer.state
    y = {"/".join(k.rsplit(".", 1)): p.detach().clone() for k, p in run.trained.items()}  # as the file names them
    x = {"/".join(k.rsplit(".", 1)): (p.detach() - (1 - beta1) * state[p]["z"]) / beta1
         for k, p in run.trained.items()}
    written = load_file(str(train(at_4, progress=False).adapter))  # ends at once: step 4 is the last
    assert set(x) <= set(written)
    for k in x:
        torch.testing.assert_close(written[k], x[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(written[k], y[k], rtol=1e-4, atol=1e-6) for k in y)
