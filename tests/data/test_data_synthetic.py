import pytest
import torch

from torch_mosa.data import (
    BatchLoader,
    SyntheticRecall,
    TokenDataset,
    load_tokenizer,
    read_meta,
    recall_accuracy,
    validate_shard_dir,
)
from torch_mosa.data.synthetic import FIRST_KEY_ID, IGNORE_INDEX, recall_task

TASK = dict(vocab_size=64, seq_len=48, num_pairs=8, seed=0)


def oracle_logits(task: SyntheticRecall, inputs: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] that solve recall by looking each key up in the pairs at the start of its sequence."""
    batch_size, seq_len = inputs.shape
    logits = torch.zeros(batch_size, seq_len, task.vocab_size)
    pairs = 2 * task.num_pairs
    for b in range(batch_size):
        value_of = {int(inputs[b, i]): int(inputs[b, i + 1]) for i in range(0, pairs, 2)}
        for t in range(pairs, seq_len):
            if int(inputs[b, t]) in value_of:
                logits[b, t, value_of[int(inputs[b, t])]] = 1.0
    return logits


def test_batches_are_well_formed():
    task = SyntheticRecall(**TASK)
    batch = task.get_batch(16)
    assert batch.inputs.shape == batch.targets.shape == batch.answer_mask.shape == (16, 48)
    first_value = task.tokenizer.first_value_id
    keys = batch.inputs[:, 0 : 2 * task.num_pairs : 2]
    values = batch.inputs[:, 1 : 2 * task.num_pairs : 2]
    assert ((keys >= FIRST_KEY_ID) & (keys < first_value)).all()
    assert ((values >= first_value) & (values < task.vocab_size)).all()
    assert all(len(set(row.tolist())) == task.num_pairs for row in keys)  # distinct keys: recall is unambiguous
    assert (batch.answer_mask.sum(dim=1) == task.num_queries).all()
    assert (batch.targets[~batch.answer_mask] == IGNORE_INDEX).all()
    assert ((batch.targets[batch.answer_mask] >= first_value)).all()


def test_recall_accuracy_of_an_oracle_is_one():
    task = SyntheticRecall(**TASK)
    batch = task.get_batch(8, step=3)
    logits = oracle_logits(task, batch.inputs)
    assert recall_accuracy(logits, batch) == 1.0
    assert recall_accuracy(torch.zeros_like(logits), batch) == 0.0  # argmax 0 is never a value
    with pytest.raises(ValueError, match="do not match"):
        recall_accuracy(logits[:, :-1], batch)


def test_deterministic_by_seed_split_and_step():
    task, same = SyntheticRecall(**TASK), SyntheticRecall(**TASK)
    assert torch.equal(task.get_batch(4, step=2).inputs, same.get_batch(4, step=2).inputs)
    assert not torch.equal(task.get_batch(4, step=2).inputs, task.get_batch(4, step=3).inputs)
    assert not torch.equal(task.get_batch(4).inputs, task.get_batch(4, split="val").inputs)
    assert not torch.equal(task.get_batch(4).inputs, SyntheticRecall(**{**TASK, "seed": 1}).get_batch(4).inputs)


def test_batches_resume_and_shard_by_rank():
    task = SyntheticRecall(**TASK)
    single = task.batches(6)
    ranks = [task.batches(3, rank=r, world_size=2) for r in range(2)]
    steps = [next(single) for _ in range(3)]
    for batch in steps:
        parts = [next(r) for r in ranks]
        assert torch.equal(batch.inputs, torch.cat([p.inputs for p in parts]))
        assert torch.equal(batch.targets, torch.cat([p.targets for p in parts]))
    assert torch.equal(next(task.batches(6, start_step=2)).inputs, steps[2].inputs)


def test_accumulated_micro_batches_cut_the_same_global_batch():
    task = SyntheticRecall(**TASK)
    whole = next(task.batches(8, start_step=1))
    # 2 ranks x 2 micro-steps of 2: micro-step m of rank r holds part m * 2 + r of the step's 8 examples.
    ranks = [task.batches(2, start_step=1, rank=r, world_size=2, grad_accum_steps=2) for r in range(2)]
    micro = [[next(r) for _ in range(2)] for r in ranks]
    parts = [micro[rank][step] for step in range(2) for rank in range(2)]
    assert torch.equal(whole.inputs, torch.cat([p.inputs for p in parts]))
    assert torch.equal(whole.targets, torch.cat([p.targets for p in parts]))
    assert torch.equal(next(ranks[0]).inputs, next(task.batches(8, start_step=2)).inputs[:2])  # then step 2


def test_shards_hold_the_sequences_and_decode_to_names(tmp_path):
    task = SyntheticRecall(**TASK)
    summary = task.write_shards(tmp_path, num_train_sequences=1500, num_val_sequences=10, progress=False)
    assert summary["tokenizer"] == "synthetic" and summary["vocab_size"] == 64
    assert summary["num_tokens"] == {"train": 1500 * 50, "val": 10 * 50}
    assert validate_shard_dir(tmp_path)["num_docs"] == {"train": 1500, "val": 10}

    val = TokenDataset(tmp_path, "val")
    tokens, _ = task.sequences(10, step=0, split="val")
    assert torch.equal(torch.from_numpy(val.window(0, 49).astype("int64")), tokens[0])
    text = val.tokenizer.decode(val.window(0, 50))
    assert text.startswith("k") and text.split()[1].startswith("v") and text.endswith("<|endoftext|>")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode(text) == val.window(0, 50).tolist()

    x, y = next(BatchLoader(TokenDataset(tmp_path), batch_size=2, seq_len=48))
    assert x.shape == (2, 48) and int(x.max()) < 64

    again = recall_task(read_meta(tmp_path))
    assert (again.vocab_size, again.seq_len, again.num_pairs, again.num_queries, again.seed) == (64, 48, 8, 8, 0)
    assert torch.equal(again.get_batch(3, step=5).inputs, task.get_batch(3, step=5).inputs)


def test_argument_errors():
    with pytest.raises(ValueError, match="num_pairs=40"):
        SyntheticRecall(vocab_size=64, seq_len=256, num_pairs=40)
    with pytest.raises(ValueError, match="seq_len=10"):
        SyntheticRecall(vocab_size=64, seq_len=10, num_pairs=8)
    with pytest.raises(ValueError, match="num_queries=9"):
        SyntheticRecall(vocab_size=64, seq_len=48, num_pairs=8, num_queries=9)
    with pytest.raises(ValueError, match="token 'x3'"):
        SyntheticRecall(**TASK).tokenizer.encode("k1 x3")
