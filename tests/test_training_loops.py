"""The training-loop variants the Recorder must follow: AMP with a GradScaler, torch.compile, several optimizers,
frozen parameters, parameter groups added during training, LR schedulers, foreach / fused optimizers, and a
state_dict that changes dtype (refused clearly). Each run is checked step by step against the states the loop
itself went through."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import amnesiac


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def data(t: int, n: int = 6):
    g = torch.Generator().manual_seed(t)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g), torch.arange(n) + n * t


def flat(model) -> dict[str, torch.Tensor]:
    return {k.replace("_orig_mod.", ""): v.detach().clone().float() for k, v in model.state_dict().items()}


def check_against(run, states: list[dict], ids: list[list[int]]):
    """Each recorded step is the change between consecutive states; each step's ledger is what was declared."""
    assert run.num_steps == len(states) - 1 == len(ids)
    layout = run.store.layout
    for t in range(run.num_steps):
        want = layout.flatten({k: states[t + 1][k] - states[t][k] for k in layout.names})
        torch.testing.assert_close(run.store.read_step(t), want, atol=1e-6, rtol=0)
        assert sorted(run.samples_of_step(t).tolist()) == sorted(ids[t])
    undo = [0, run.num_steps - 1]
    state = run.unlearn(steps=undo)
    for k in layout.names:
        want = states[-1][k] - sum(states[t + 1][k] - states[t][k] for t in undo)
        torch.testing.assert_close(state[k].float(), want, atol=1e-5, rtol=0)


def loop(model, optimizers, rec, steps, *, before_step=None, schedulers=()):
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    states, ids = [flat(model)], []
    for t in range(steps):
        x, y, batch_ids = data(t)
        rec.add_batch(batch_ids, labels=y)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if before_step:
            before_step(t)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        for s in schedulers:
            s.step()
        states.append(flat(model))
        ids.append(batch_ids.tolist())
    return states, ids


def test_grad_scaler_skipped_step_records_nothing_and_drops_its_samples(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    states, ids, skipped = [flat(model)], [], []
    with amnesiac.Recorder(model, opt, tmp_path / "run", durable=False, scaler=scaler) as rec:
        for t in range(5):
            x, y, batch_ids = data(t)
            rec.add_batch(batch_ids, labels=y)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            if t in (1, 3):  # an overflow: the scaler skips this step
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if t in (1, 3):
                skipped.append(batch_ids.tolist())
                assert torch.equal(flat(model)["0.weight"], states[-1]["0.weight"])
                continue
            states.append(flat(model))
            ids.append(batch_ids.tolist())
    assert scaler.get_scale() < 2.0 ** 4  # the scaler really saw the overflows
    run = amnesiac.open_run(tmp_path / "run")
    check_against(run, states, ids)  # 3 steps, each with its own samples only
    assert not np.isin(np.concatenate(skipped), run.sample_ids()).any()


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_is_stored_under_the_plain_names(tmp_path, backend):
    model = make_model()
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with amnesiac.Recorder(compiled, opt, tmp_path / "run", durable=False) as rec:
        states, ids = loop(compiled, opt, rec, 3)
    run = amnesiac.open_run(tmp_path / "run")
    assert run.store.layout.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert not any("_orig_mod" in k for k in run.final_state())
    check_against(run, states, ids)
    make_model(seed=1).load_state_dict(run.unlearn(sample_ids=[0]))  # loads into the plain model


def test_several_optimizers_give_one_step_per_iteration(tmp_path):
    model = make_model()
    opts = [torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.Adam(model[2].parameters(), lr=0.05)]
    with amnesiac.Recorder(model, opts, tmp_path / "run", durable=False) as rec:  # recorded after the last
        states, ids = loop(model, opts, rec, 4)
    check_against(amnesiac.open_run(tmp_path / "run"), states, ids)

    # the trigger is configurable: recording after the first optimizer moves the second's update of an iteration
    # into the next recorded step; the sum still adds up (close records the last one as a trailing step)
    model = make_model()
    opts = [torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.Adam(model[2].parameters(), lr=0.05)]
    with amnesiac.Recorder(model, opts, tmp_path / "first", durable=False, record_on=opts[0]) as rec:
        loop(model, opts, rec, 4)
    run = amnesiac.open_run(tmp_path / "first")
    assert run.num_steps == 5 and run.samples_of_step(4).size == 0
    torch.testing.assert_close(run.unlearn(steps=[])["2.weight"], model[2].weight.detach(), atol=1e-6, rtol=0)
    with pytest.raises(amnesiac.RecorderError, match="record_on"):
        amnesiac.Recorder(model, opts, tmp_path / "bad", durable=False, record_on=5)


def test_frozen_parameters_and_groups_added_during_training(tmp_path):
    model = make_model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)

    def unfreeze(t):
        if t == 2:  # fine-tune the first layer from step 2 on, in a group of its own
            for p in model[0].parameters():
                p.requires_grad_(True)
            opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.05})

    with amnesiac.Recorder(model, opt, tmp_path / "run", durable=False) as rec:
        states, ids = loop(model, opt, rec, 4, before_step=unfreeze)
    run = amnesiac.open_run(tmp_path / "run")
    check_against(run, states, ids)
    assert run.store.read_step(0)[:40].abs().max() == 0  # frozen: recorded, unchanged
    assert run.store.read_step(3)[:40].abs().max() > 0


def test_lr_schedulers(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]
    with amnesiac.Recorder(model, opt, tmp_path / "run", durable=False) as rec:
        states, ids = loop(model, opt, rec, 4, schedulers=schedulers)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 ** 4)
    check_against(amnesiac.open_run(tmp_path / "run"), states, ids)


@pytest.mark.parametrize("kind", ["foreach", "fused"])
def test_foreach_and_fused_optimizers(tmp_path, kind):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, **{kind: True})
    with amnesiac.Recorder(model, opt, tmp_path / "run", durable=False) as rec:
        states, ids = loop(model, opt, rec, 3)
    check_against(amnesiac.open_run(tmp_path / "run"), states, ids)


def test_a_state_dict_that_changes_dtype_is_refused_clearly(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = amnesiac.Recorder(model, opt, tmp_path / "run", durable=False)
    loop(model, opt, rec, 2)
    model.to(torch.float64)
    x, y, ids = data(2)
    rec.add_batch(ids)
    torch.nn.functional.cross_entropy(model(x.double()), y).backward()
    with pytest.raises(amnesiac.RecorderError, match=r"'0.weight' is float64 at step 2.*recorded it as float32"):
        opt.step()
    rec.close(finalize=False)
    run = amnesiac.open_run(tmp_path / "run")
    assert run.num_steps == 2 and not run.complete
