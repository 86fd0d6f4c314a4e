"""Every unlearning method on one small recorded run: what each must do to the forget set and the rest."""

from __future__ import annotations

import pytest
import torch

from amnesiac import Recorder, open_run
from amnesiac.baselines import METHODS, UnlearnTask, run_method
from amnesiac.data import apply_reductions, load_dataset
from amnesiac.errors import AmnesiacError
from amnesiac.models import build_model, model_spec
from amnesiac.training import accuracy, make_optimizer, train


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    bundle = load_dataset("digits", seed=0)
    data_spec = {**bundle.spec, "keep_class": 3, "keep_count": 40}
    bundle = apply_reductions(bundle, data_spec)
    spec = model_spec("mlp", bundle.input_shape, 10)
    torch.manual_seed(0)
    model = build_model(spec)
    opt = make_optimizer(model)
    run_dir = tmp_path_factory.mktemp("baselines") / "run"
    extra = {"data": data_spec, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "epochs": 10, "seed": 0}
    with Recorder(model, opt, run_dir, durable=False, model_spec=spec, extra=extra) as rec:
        train(model, opt, bundle.train, epochs=10, batch_size=64, seed=0, recorder=rec)
    return UnlearnTask.from_run(open_run(run_dir), classes=[3], bundle=bundle)


def test_task_splits_the_training_set(task):
    assert len(task.forget_set) == 40 and (task.forget_set.labels == 3).all()
    assert len(task.forget_set) + len(task.retained) == len(task.train_set)
    assert not torch.isin(task.retained.ids, task.forget_set.ids).any()
    assert (task.epochs, task.batch_size, task.optimizer) == (10, 64, "adam")


def test_amnesiac_equals_the_run_s_unlearn(task):
    result = run_method("amnesiac", task)
    expected = task.run.unlearn(classes=[3])
    assert all(torch.allclose(result.state[k], expected[k], atol=1e-6) for k in expected)
    assert result.info["steps_undone"] == task.run.steps_for(classes=[3]).size > 0


def test_retrain_starts_from_the_run_s_initial_weights_and_never_sees_the_forget_set(task):
    a = run_method("retrain", task, epochs=1)
    b = run_method("retrain", task, epochs=1)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)  # deterministic
    # one epoch on the retained data from S_0 differs from the start but only by training on retained samples
    start = task.run.start_state()
    assert any(not torch.equal(a.state[k], start[k]) for k in start)
    model = task.model(a.state)
    assert accuracy(model, task.forget_set)["overall"] < 0.5


@pytest.mark.parametrize("name", ["amnesiac", "amnesiac-finetune", "retrain", "finetune", "relabel", "neggrad"])
def test_every_method_returns_a_complete_state_and_a_time(task, name):
    result = METHODS[name](task)
    final = task.run.final_state()
    assert sorted(result.state) == sorted(final) and result.seconds > 0
    assert any(not torch.equal(result.state[k], final[k]) for k in final)  # it changed something
    assert result.name == name


def test_forgetting_methods_reduce_forget_set_accuracy(task):
    before = accuracy(task.model(), task.forget_set)["overall"]
    assert before > 0.5
    for name, options in (("amnesiac", {}), ("relabel", {"epochs": 2}), ("neggrad", {"epochs": 5, "lr": 0.05}),
                          ("retrain", {})):
        after = accuracy(task.model(run_method(name, task, **options).state), task.forget_set)["overall"]
        assert after < before, name


def test_finetune_after_amnesiac_repairs_retained_accuracy(task):
    am = run_method("amnesiac", task)
    amf = run_method("amnesiac-finetune", task, epochs=2)
    acc = accuracy(task.model(am.state), task.test_set, [3])["retained"]
    acc_ft = accuracy(task.model(amf.state), task.test_set, [3])["retained"]
    assert acc_ft >= acc
    assert amf.info["finetune_epochs"] == 2 and amf.seconds >= amf.info["unlearn_seconds"]


def test_relabel_gives_wrong_labels_only_to_the_forget_set():
    from amnesiac.training import _relabelled
    y = torch.tensor([3, 1, 3, 2])
    ids = torch.tensor([10, 11, 12, 13])
    out = _relabelled(y, ids, torch.tensor([10, 12]), torch.tensor([7, 8]))
    assert out.tolist() == [7, 1, 8, 2]


def test_bad_requests(task):
    with pytest.raises(AmnesiacError, match="unknown method"):
        run_method("forget-harder", task)
    with pytest.raises(AmnesiacError, match="exactly one"):
        UnlearnTask.from_run(task.run, classes=[3], sample_ids=[1])


def test_forget_by_sample_ids_and_steps(task):
    ids = task.train_set.ids[:3].tolist()
    t = UnlearnTask.from_run(task.run, sample_ids=ids, bundle=_bundle_of(task))
    assert sorted(t.forget_set.ids.tolist()) == sorted(ids)
    steps = t.run.steps_for(sample_ids=ids)[:1].tolist()
    t2 = UnlearnTask.from_run(task.run, steps=steps, bundle=_bundle_of(task))
    assert len(t2.forget_set) == len(task.run.samples_of_step(steps[0]))


def _bundle_of(task):
    from amnesiac.data import DataBundle
    return DataBundle("digits", task.train_set, task.test_set, 10)


def test_baselines_refuse_ids_outside_the_training_data(task):
    from amnesiac import SelectionError
    test_id = int(task.test_set.ids[0])  # a real sample, but never trained on
    train_id = int(task.train_set.ids[0])
    with pytest.raises(SelectionError, match="not in the run's training data"):
        UnlearnTask.from_run(task.run, sample_ids=[train_id, test_id], bundle=_bundle_of(task))
    assert len(UnlearnTask.from_run(task.run, sample_ids=[train_id], bundle=_bundle_of(task)).forget_set) == 1


def _bundle_of(task):
    from amnesiac.data import DataBundle
    return DataBundle("digits", task.train_set, task.test_set, 10)
