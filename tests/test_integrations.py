"""The trainer integrations with the real packages, on the CPU with a tiny model: PyTorch Lightning and the Hugging
Face Trainer record the same run a plain loop would, and resume through their own checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import amnesiac

N, BATCH = 24, 4


def item(i: int) -> dict:
    g = torch.Generator().manual_seed(500 + i)
    return {"x": torch.randn(5, generator=g), "labels": i % 3, "sample_id": i}


DATA = [item(i) for i in range(N)]


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def same_run(a, b, atol=1e-6):
    assert a.num_steps == b.num_steps and a.complete and b.complete
    for t in range(a.num_steps):
        assert np.array_equal(np.sort(a.samples_of_step(t)), np.sort(b.samples_of_step(t)))
    for select in ({"sample_ids": [3]}, {"classes": [1]}, {"steps": []}):
        got, want = a.unlearn(**select), b.unlearn(**select)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- PyTorch Lightning
L = pytest.importorskip("lightning")
from amnesiac.integrations.lightning import AmnesiacCallback as LightningCallback  # noqa: E402


class Module(L.LightningModule):
    def __init__(self, crash_at: int | None = None):
        super().__init__()
        self.net, self.crash_at = make_net(), crash_at

    def training_step(self, batch, batch_idx):
        if self.crash_at is not None and self.global_step == self.crash_at:
            raise RuntimeError("simulated crash")
        return torch.nn.functional.cross_entropy(self.net(batch["x"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader():
    return torch.utils.data.DataLoader(DATA, batch_size=BATCH, shuffle=False)


def trainer(tmp_path, callback, accumulate=1, epochs=2, checkpoint_every=None):
    callbacks = [callback]
    if checkpoint_every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=checkpoint_every,
                                                             save_top_k=-1, filename="{step}"))
    return L.Trainer(max_epochs=epochs, accumulate_grad_batches=accumulate, callbacks=callbacks, logger=False,
                     enable_checkpointing=bool(checkpoint_every), enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)


def plain_loop(run_dir, accumulate=1, epochs=2):
    holder = torch.nn.Module()
    holder.net = net = make_net()  # the LightningModule's names: net.0.weight, ...
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with amnesiac.Recorder(holder, opt, run_dir, durable=False) as rec:
        for epoch in range(epochs):
            for i, batch in enumerate(loader()):
                rec.add_batch(batch["sample_id"], labels=batch["labels"])
                (torch.nn.functional.cross_entropy(net(batch["x"]), batch["labels"]) / accumulate).backward()
                if (i + 1) % accumulate == 0:
                    opt.step()
                    opt.zero_grad()
    return amnesiac.open_run(run_dir)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_records_what_a_plain_loop_records(tmp_path, accumulate):
    callback = LightningCallback(tmp_path / "run", labels_key="labels", durable=False)
    trainer(tmp_path, callback, accumulate=accumulate).fit(Module(), loader())
    run = amnesiac.open_run(tmp_path / "run")
    assert run.num_steps == 2 * N // BATCH // accumulate
    assert sorted(run.final_state()) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    reference = plain_loop(tmp_path / "plain", accumulate=accumulate)
    same_run(run, reference)


def test_lightning_resumes_through_its_own_checkpoint(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path, LightningCallback(tmp_path / "run", labels_key="labels", durable=False),
                checkpoint_every=6).fit(Module(crash_at=8), loader())
    assert not amnesiac.open_run(tmp_path / "run").complete
    assert amnesiac.open_run(tmp_path / "run").num_steps == 8  # steps 6 and 7 come again after the resume
    # (a checkpoint at the end of epoch 1: Lightning restarts an epoch whose DataLoader cannot resume mid-way)
    trainer(tmp_path, LightningCallback(tmp_path / "run", labels_key="labels", durable=False),
            checkpoint_every=6).fit(Module(), loader(), ckpt_path=str(tmp_path / "ckpt" / "step=6.ckpt"))
    callback = LightningCallback(tmp_path / "whole", labels_key="labels", durable=False)
    trainer(tmp_path / "w", callback).fit(Module(), loader())
    same_run(amnesiac.open_run(tmp_path / "run"), amnesiac.open_run(tmp_path / "whole"))


def test_lightning_ids_from_a_function_and_missing_ids(tmp_path):
    tuples = [(d["x"], d["labels"], d["sample_id"]) for d in DATA]

    class TupleModule(Module):
        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    callback = LightningCallback(tmp_path / "run", ids_fn=lambda b: b[2] + 1000, durable=False)
    trainer(tmp_path, callback, epochs=1).fit(TupleModule(), torch.utils.data.DataLoader(tuples, batch_size=BATCH))
    assert amnesiac.open_run(tmp_path / "run").sample_ids().tolist() == list(range(1000, 1000 + N))
    with pytest.raises(amnesiac.RecorderError, match="no 'sample_id' entry"):
        trainer(tmp_path, LightningCallback(tmp_path / "run2", durable=False), epochs=1).fit(
            TupleModule(), torch.utils.data.DataLoader(tuples, batch_size=BATCH))


# ---------------------------------------------------------------- Hugging Face Trainer
transformers = pytest.importorskip("transformers")
from amnesiac.integrations.hf import POSITION_FILE, AmnesiacCallback as HFCallback  # noqa: E402

ID_OF_ROW = {tuple(d["x"].tolist()): d["sample_id"] for d in DATA}


class HFNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_net()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class Witness(transformers.TrainerCallback):
    """What the Trainer really did: the state after each optimizer step and the ids its training forwards saw."""

    def __init__(self, crash_at=None):
        self.states, self.ids, self.seen, self.crash_at = [], [], [], crash_at

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_hook(lambda m, args, kwargs, out: self.seen.extend(
            ID_OF_ROW[tuple(r.tolist())] for r in kwargs["x"]) if m.training else None, with_kwargs=True)
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        self.ids.append(sorted(self.seen))
        self.seen = []
        if state.global_step == self.crash_at:
            raise RuntimeError("simulated crash")


def hf_train(out, callback, *, witness=None, accumulate=1, save_steps=None, resume=None):
    args = transformers.TrainingArguments(
        str(out), per_device_train_batch_size=BATCH, num_train_epochs=2, gradient_accumulation_steps=accumulate,
        learning_rate=0.05, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_strategy="no",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500)
    trainer = transformers.Trainer(HFNet(), args, train_dataset=DATA, callbacks=[callback, witness or Witness()])
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_hf_trainer_records_each_step_with_the_samples_it_trained_on(tmp_path, accumulate):
    witness = Witness()
    hf_train(tmp_path, HFCallback(tmp_path / "run", labels_key="labels", durable=False), witness=witness,
             accumulate=accumulate)
    run = amnesiac.open_run(tmp_path / "run")
    assert run.complete and run.num_steps == len(witness.ids) == 2 * N // BATCH // accumulate
    for t in range(run.num_steps):
        assert sorted(run.samples_of_step(t).tolist()) == witness.ids[t]
        want = {k: witness.states[t + 1][k] - witness.states[t][k] for k in run.store.layout.names}
        torch.testing.assert_close(run.store.read_step(t), run.store.layout.flatten(want), atol=1e-6, rtol=0)
    assert sorted(run.sample_ids().tolist()) == list(range(N))
    assert run.steps_for(classes=[2]).size > 0  # labels came from the "labels" key


def test_hf_trainer_resumes_through_its_own_checkpoint(tmp_path):
    first = HFCallback(tmp_path / "run", durable=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        hf_train(tmp_path / "out", first, witness=Witness(crash_at=8), save_steps=6)
    first.close(finalize=False)  # what a crashed process leaves: an incomplete run
    assert (tmp_path / "out" / "checkpoint-6" / POSITION_FILE).is_file()
    assert amnesiac.open_run(tmp_path / "run").num_steps == 8
    hf_train(tmp_path / "out", HFCallback(tmp_path / "run", durable=False), save_steps=6, resume=True)
    hf_train(tmp_path / "whole", HFCallback(tmp_path / "whole-run", durable=False))
    a, b = amnesiac.open_run(tmp_path / "run"), amnesiac.open_run(tmp_path / "whole-run")
    assert a.num_steps == 12
    same = [np.array_equal(np.sort(a.samples_of_step(t)), np.sort(b.samples_of_step(t))) for t in range(12)]
    assert all(same), same
    for select in ({"sample_ids": [3]}, {"steps": []}):
        got, want = a.unlearn(**select), b.unlearn(**select)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
