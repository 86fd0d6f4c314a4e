"""Unlearning against a naive in-memory reference (the seed's approach: every delta kept in a list)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import amnesiac
from amnesiac import SelectionError

EPOCHS, BATCH, N = 3, 16, 96


def train_recorded_and_naive(model, run_dir, codec="fp32", backend="zarr"):
    """Train over shuffled epochs, recording with the Recorder and, beside it, keeping every delta in a list."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (N,), generator=g)
    ids = torch.arange(1000, 1000 + N)  # ids that are not positions, as in real data sets
    loader = DataLoader(TensorDataset(x, y, ids), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    floating = lambda: {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    naive_deltas, naive_ids, per_epoch_index = [], [], []
    start = floating()
    with amnesiac.Recorder(model, opt, run_dir, codec=codec, backend=backend, durable=False) as rec:
        for epoch in range(EPOCHS):
            for b, (xb, yb, ib) in enumerate(loader):
                rec.add_batch(ib, labels=yb)
                before = floating()
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
                after = floating()
                naive_deltas.append({k: after[k] - before[k] for k in after})
                naive_ids.append(set(ib.tolist()))
                per_epoch_index.append(b)
    return start, floating(), naive_deltas, naive_ids, per_epoch_index, y, ids


def naive_unlearn(final, deltas, steps):
    out = {k: v.clone() for k, v in final.items()}
    for t in steps:
        for k in out:
            out[k] -= deltas[t][k]
    return out


def assert_states_close(state, reference, atol=1e-5):
    for k, ref in reference.items():
        assert torch.allclose(state[k], ref, atol=atol), f"{k} differs by {(state[k] - ref).abs().max()}"


@pytest.mark.parametrize("backend", ["zarr", "safetensors"])
def test_unlearn_matches_naive_reference_with_batchnorm(tmp_path, bn_model, backend):
    start, final, deltas, batch_ids, _, _, ids = train_recorded_and_naive(bn_model, tmp_path / "run",
                                                                          backend=backend)
    run = amnesiac.open_run(tmp_path / "run")
    assert run.num_steps == len(deltas) == EPOCHS * (N // BATCH)
    assert "bn.running_mean" in run.store.layout.names and "bn.running_var" in run.store.layout.names
    # the recorded deltas sum to theta_final - theta_0
    total = run.store.layout.unflatten(run.store.sum_steps(range(run.num_steps)))
    assert_states_close(total, {k: final[k] - start[k] for k in final})

    forget = [int(ids[5]), int(ids[40])]
    expected_steps = sorted(t for t, s in enumerate(batch_ids) if s & set(forget))
    assert run.steps_for(sample_ids=forget).tolist() == expected_steps
    state = run.unlearn(sample_ids=forget)
    assert_states_close(state, naive_unlearn(final, deltas, expected_steps))
    # integer buffers come back whole, and the state loads into the model
    assert state["bn.num_batches_tracked"].item() == run.num_steps
    bn_model.load_state_dict(state)


def test_steps_are_flat_indices_not_per_epoch_batch_indices(tmp_path, bn_model):
    """The seed compared per-epoch batch indices with a flat step index and undid the wrong batches."""
    _, final, deltas, batch_ids, per_epoch, _, ids = train_recorded_and_naive(bn_model, tmp_path / "run")
    run = amnesiac.open_run(tmp_path / "run")
    sample = int(ids[7])
    flat = [t for t, s in enumerate(batch_ids) if sample in s]
    buggy = sorted({per_epoch[t] for t in flat})  # what the seed undid: positions within each epoch
    assert len(flat) == EPOCHS and flat != buggy  # shuffling put the sample in later epochs' batches
    assert run.steps_for(sample_ids=[sample]).tolist() == flat
    good = run.unlearn(sample_ids=[sample])
    assert_states_close(good, naive_unlearn(final, deltas, flat))
    wrong = naive_unlearn(final, deltas, buggy)
    assert any(not torch.allclose(good[k], wrong[k], atol=1e-5) for k in wrong)


def test_complement_path_gives_the_same_answer(tmp_path, bn_model):
    _, final, deltas, batch_ids, _, _, ids = train_recorded_and_naive(bn_model, tmp_path / "run")
    run = amnesiac.open_run(tmp_path / "run")
    many = list(range(run.num_steps - 3))  # more than half: the start-plus-others plan is cheaper
    report = run.unlearn_report(steps=many)
    assert report.plan == "start-plus-others" and report.steps_read == 3
    assert_states_close(report.state, naive_unlearn(final, deltas, many))
    few = run.unlearn_report(steps=[0, 4])
    assert few.plan == "final-minus-selected" and few.steps_read == 2


def test_class_selection(tmp_path, bn_model):
    _, final, deltas, batch_ids, _, labels, ids = train_recorded_and_naive(bn_model, tmp_path / "run")
    run = amnesiac.open_run(tmp_path / "run")
    members = set(ids[labels == 2].tolist())
    expected = [t for t, s in enumerate(batch_ids) if s & members]
    assert run.steps_for(classes=[2]).tolist() == expected
    assert_states_close(run.unlearn(classes=[2]), naive_unlearn(final, deltas, expected))


@pytest.mark.parametrize("codec", ["fp16", "bf16", "topk:0.5"])
def test_lossy_codecs_unlearn_close_to_the_reference(tmp_path, bn_model, codec):
    _, final, deltas, batch_ids, _, _, ids = train_recorded_and_naive(bn_model, tmp_path / "run", codec=codec)
    run = amnesiac.open_run(tmp_path / "run")
    steps = run.steps_for(sample_ids=[int(ids[3])]).tolist()
    state = run.unlearn(steps=steps)
    ref = naive_unlearn(final, deltas, steps)
    diff = sum((state[k] - ref[k]).norm() ** 2 for k in ref) ** 0.5
    moved = sum(sum(deltas[t][k] for t in steps).norm() ** 2 for k in ref) ** 0.5
    assert diff / moved < (0.02 if codec != "topk:0.5" else 0.5)


def test_unlearn_selection_errors(tmp_path, bn_model):
    train_recorded_and_naive(bn_model, tmp_path / "run")
    run = amnesiac.open_run(tmp_path / "run")
    with pytest.raises(SelectionError, match="exactly one"):
        run.unlearn()
    with pytest.raises(SelectionError, match="one selection"):
        run.unlearn(sample_ids=[1000], classes=[1])
    with pytest.raises(SelectionError, match="never appear"):
        run.unlearn(sample_ids=[1000, 5])
    with pytest.raises(SelectionError, match="never appear"):
        run.steps_for(classes=[9])
    with pytest.raises(SelectionError, match="not committed"):
        run.unlearn(steps=[run.num_steps])
    with pytest.raises(ValueError):  # also a ValueError for callers that know nothing of us
        run.unlearn(sample_ids=[-1])


def test_unlabelled_run_refuses_class_selection(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with amnesiac.Recorder(model, opt, tmp_path / "run", durable=False) as rec:
        rec.add_batch([1, 2])
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
    run = amnesiac.open_run(tmp_path / "run")
    with pytest.raises(SelectionError, match="labels="):
        run.steps_for(classes=[0])
    assert run.steps_for(sample_ids=[2]).tolist() == [0]
    assert np.array_equal(run.sample_ids(), [1, 2])


@pytest.mark.parametrize("codec", ["fp32", "fp16"])
def test_a_change_after_the_last_step_is_recorded_so_both_plans_agree(tmp_path, bn_model, codec):
    """A forward pass in training mode after the last optimizer step moves BatchNorm's running statistics: that
    change must land in a (sample-free) trailing step, or theta_0 + sum(deltas) != theta_final."""
    from deltastore.verify import verify_store
    opt = torch.optim.SGD(bn_model.parameters(), lr=0.1)
    x = torch.randn(8, 1, 8, 8)
    with amnesiac.Recorder(bn_model, opt, tmp_path / "run", codec=codec, durable=False) as rec:
        for t in range(6):
            rec.add_batch([t])
            opt.zero_grad()
            bn_model(x).sum().backward()
            opt.step()
        with torch.no_grad():
            bn_model(x + 5)  # training mode: the running statistics move, no optimizer step
    run = amnesiac.open_run(tmp_path / "run")
    assert run.num_steps == 7 and run.samples_of_step(6).size == 0
    assert verify_store(run.store)["ok"]
    # both plans give S_T - sum(selected): undoing every step (start plan) gives S_0 (+ a lossy codec's residual),
    # undoing none (final plan) gives S_T
    layout = run.store.layout
    everything = run.unlearn_report(steps=list(range(run.num_steps)))
    assert everything.plan == "start-plus-others"
    expected_start = run.store.read_snapshot_flat("start") + run.store.read_snapshot_flat("residual")
    assert torch.allclose(layout.flatten(everything.state), expected_start, atol=1e-5)
    nothing = run.unlearn_report(steps=[])
    assert nothing.plan == "final-minus-selected"
    assert torch.allclose(layout.flatten(nothing.state), run.store.read_snapshot_flat("final"), atol=1e-6)


def test_add_batch_rejects_mixed_labels_without_keeping_the_rejected_call(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with amnesiac.Recorder(model, opt, tmp_path / "run", durable=False) as rec:
        rec.add_batch([1, 2], labels=[0, 1])
        with pytest.raises(amnesiac.RecorderError, match="for every batch"):
            rec.add_batch([3])  # labelled then unlabelled
        with pytest.raises(amnesiac.RecorderError, match="2 ids but 1 labels"):
            rec.add_batch([4, 5], labels=[1])
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        rec.add_batch([6])
        with pytest.raises(amnesiac.RecorderError, match="for every batch"):
            rec.add_batch([7], labels=[0])  # unlabelled then labelled
        rec.add_batch([8])
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
    run = amnesiac.open_run(tmp_path / "run")
    assert run.samples_of_step(0).tolist() == [1, 2]  # the rejected calls left nothing behind
    assert run.samples_of_step(1).tolist() == [6, 8]
