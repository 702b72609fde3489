"""The loss with a real tiny Llama: packing is exact, accumulation is exact, empty batches are safe."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.support.training import corpus_dataset
from trainer import SFTTrainer, ShardDataset, TrainConfig, collate
from trainer.batching import collate_packed
from trainer.loss import count_targets
from trainer.models import tiny_model


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bpe_tokenizer, bpe_tokenizer_path):
    folder = corpus_dataset(tmp_path_factory.mktemp("loss") / "data", bpe_tokenizer, bpe_tokenizer_path, repeat=1)
    return ShardDataset(folder, "train")


def make_trainer(dataset, tokenizer, tmp_path, attn="sdpa", seed=0):
    torch.manual_seed(0)
    model = tiny_model(tokenizer, seed=seed, attn_implementation=attn)
    config = TrainConfig(data=dataset.data_dir, out=tmp_path / "run", device="cpu", batch_tokens=1024, lr=1e-3, progress=False)
    return SFTTrainer(model, dataset, None, config, tokenizer=tokenizer)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(dataset, bpe_tokenizer, tmp_path, attn):
    trainer = make_trainer(dataset, bpe_tokenizer, tmp_path, attn)
    rows = [dataset[i] for i in (0, 3, 7, 11)]
    with torch.no_grad():
        unpacked = trainer.compute_loss(collate(rows, bpe_tokenizer.pad_token_id))
        packed_batch = collate_packed([rows[:3], rows[3:]], bpe_tokenizer.pad_token_id)
        packed = trainer.compute_loss(packed_batch)
        # Control: the same packed tokens with positions that do not restart let sequences see
        # each other, which must change the loss (otherwise this test could not fail).
        leaky = dict(packed_batch, position_ids=torch.arange(packed_batch["input_ids"].shape[1]).expand_as(packed_batch["input_ids"]))
        leaky_loss = trainer.compute_loss(leaky)
    assert packed_batch["packed"]
    assert torch.isfinite(unpacked)
    assert packed.item() == pytest.approx(unpacked.item(), abs=1e-6)
    # a random-init model attends weakly, but a leak still moves the loss far beyond that tolerance
    assert abs(leaky_loss.item() - unpacked.item()) > 1e-4


def test_four_micro_batches_give_the_same_update_as_one_big_batch(dataset, bpe_tokenizer, tmp_path):
    rows = [dataset[i] for i in range(12)]
    # deliberately uneven micro-batches: per-micro-batch means would weigh tokens unequally
    groups = [[rows[0]], [rows[1], rows[2]], [rows[3], rows[4], rows[5], rows[6]], rows[7:]]
    micro = [collate(g, bpe_tokenizer.pad_token_id) for g in groups]
    big = collate(rows, bpe_tokenizer.pad_token_id)

    accumulated = make_trainer(dataset, bpe_tokenizer, tmp_path / "a")
    one_batch = make_trainer(dataset, bpe_tokenizer, tmp_path / "b")
    result_micro = accumulated.forward_backward(micro)
    result_big = one_batch.forward_backward([big])
    assert result_micro["trained_tokens"] == result_big["trained_tokens"]
    assert result_micro["loss"] == pytest.approx(result_big["loss"], rel=1e-5)
    for (name, p_micro), (_, p_big) in zip(accumulated.model.named_parameters(), one_batch.model.named_parameters()):
        torch.testing.assert_close(p_micro.grad, p_big.grad, rtol=1e-4, atol=1e-6, msg=name)

    with torch.no_grad():
        mean_of_means = np.mean([accumulated.compute_loss(b).item() for b in micro])
    assert abs(mean_of_means - result_big["loss"]) > 1e-4, "control: naive averaging differs"

    accumulated.optimizer_step(result_micro["trained_tokens"])
    one_batch.optimizer_step(result_big["trained_tokens"])
    for p_micro, p_big in zip(accumulated.model.parameters(), one_batch.model.parameters()):
        torch.testing.assert_close(p_micro, p_big, rtol=1e-5, atol=1e-6)


def test_batch_without_trained_tokens_gives_zero_loss_not_nan(dataset, bpe_tokenizer, tmp_path):
    trainer = make_trainer(dataset, bpe_tokenizer, tmp_path)
    row = dataset[0]
    prompt_only = {"input_ids": row["input_ids"], "labels": np.full_like(row["labels"], -100)}
    batch = collate([prompt_only], bpe_tokenizer.pad_token_id)
    loss = trainer.compute_loss(batch)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None)

    trainer.optimizer.zero_grad()
    before = copy.deepcopy(trainer.model.state_dict())
    result = trainer.forward_backward([batch])
    assert result["loss"] == 0.0 and result["trained_tokens"] == 0
    trainer.optimizer_step(result["trained_tokens"])
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} moved on a step with nothing to learn"


@pytest.mark.parametrize("chunk", [0, 1024])
def test_batch_without_trained_tokens_still_gives_every_parameter_a_zero_gradient(dataset, bpe_tokenizer, tmp_path, chunk):
    """DDP and FSDP reduce each gradient as it arrives: a rank whose micro-batch has no trained
    target must still produce all of them (zeros), or the ranks' collectives no longer match
    (2-rank DDP aborted in gloo, FSDP hung, when the chunked loss left the decoder out)."""
    torch.manual_seed(0)
    model = tiny_model(bpe_tokenizer, seed=0)
    config = TrainConfig(
        data=dataset.data_dir, out=tmp_path / "run", device="cpu", batch_tokens=1024, progress=False, loss_chunk_tokens=chunk
    )
    trainer = SFTTrainer(model, dataset, None, config, tokenizer=bpe_tokenizer)
    assert trainer.objective.chunked == bool(chunk)
    row = dataset[0]
    batch = collate([{"input_ids": row["input_ids"], "labels": np.full_like(row["labels"], -100)}], bpe_tokenizer.pad_token_id)
    loss = trainer.compute_loss(batch)
    loss.backward()
    assert loss.item() == 0.0
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:3]}"
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def _loss_and_grads(dataset, tokenizer, tmp_path, chunk, batch, weights=None):
    torch.manual_seed(0)
    model = tiny_model(tokenizer, seed=0)
    config = TrainConfig(
        data=dataset.data_dir, out=tmp_path / f"run{chunk}", device="cpu", batch_tokens=1024, progress=False, loss_chunk_tokens=chunk
    )
    trainer = SFTTrainer(model, dataset, None, config, tokenizer=tokenizer)
    batch = dict(batch, loss_weights=weights) if weights is not None else batch
    loss = trainer.compute_loss(batch)
    loss.backward()
    return trainer, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_loss_equals_the_plain_loss_in_value_and_gradients(dataset, bpe_tokenizer, tmp_path, packed):
    rows = [dataset[i] for i in range(6)]
    batch = collate_packed([rows[:3], rows[3:]], bpe_tokenizer.pad_token_id) if packed else collate(rows, bpe_tokenizer.pad_token_id)
    plain_trainer, plain, plain_grads = _loss_and_grads(dataset, bpe_tokenizer, tmp_path, 0, batch)
    # chunks of 7 trained positions: many chunks, the last one partial
    chunked_trainer, chunked, chunked_grads = _loss_and_grads(dataset, bpe_tokenizer, tmp_path, 7, batch)
    assert not plain_trainer.objective.chunked and chunked_trainer.objective.chunked
    assert chunked == pytest.approx(plain, abs=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_per_token_loss_weights_scale_each_target_in_both_paths(dataset, bpe_tokenizer, tmp_path):
    rows = [dataset[i] for i in range(4)]
    batch = collate(rows, bpe_tokenizer.pad_token_id)
    weights = torch.ones(batch["labels"].shape)
    weights[:2] = 2.0  # the first two rows count double
    _, unweighted, _ = _loss_and_grads(dataset, bpe_tokenizer, tmp_path, 0, batch)
    for chunk in (0, 5):
        _, weighted, _ = _loss_and_grads(dataset, bpe_tokenizer, tmp_path, chunk, batch, weights)
        # the same value as summing per-row losses by hand, weight 2 on the first two rows
        single = [_loss_and_grads(dataset, bpe_tokenizer, tmp_path, 0, collate([r], bpe_tokenizer.pad_token_id))[1] for r in rows]
        counts = [count_targets(collate([r], bpe_tokenizer.pad_token_id)) for r in rows]
        expected = sum(w * loss * c for w, loss, c in zip((2, 2, 1, 1), single, counts)) / sum(counts)
        assert weighted == pytest.approx(expected, rel=1e-5)
        assert weighted != pytest.approx(unweighted, rel=1e-3)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_chunked_loss_matches_the_plain_one_with_a_bias_softcap_and_weights(softcap):
    """The parts the tiny Llama does not have: a head bias, Gemma-2's logit softcap, token weights."""
    from trainer.loss import chunked_cross_entropy, summed_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    with torch.no_grad():
        head.weight.mul_(8)  # sharp logits, so the softcap's tanh bends them
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 8))
    targets[0, :3] = -100
    weights = torch.rand(2, 8) + 0.5

    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    expected = summed_cross_entropy(logits, targets, weights)
    expected.backward()
    want = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    actual = chunked_cross_entropy(hidden, head, targets, weights, chunk_tokens=3, softcap=softcap)
    actual.backward()
    assert actual.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, wanted in zip((hidden.grad, head.weight.grad, head.bias.grad), want):
        torch.testing.assert_close(got, wanted, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # evaluation: the same loss, no gradients computed
        again = chunked_cross_entropy(hidden, head, targets, weights, chunk_tokens=3, softcap=softcap)
    assert again.item() == pytest.approx(expected.item(), rel=1e-6)


def test_chunked_loss_under_bf16_autocast_stays_close_to_the_plain_one(dataset, bpe_tokenizer, tmp_path):
    rows = [dataset[i] for i in range(6)]
    batch = collate(rows, bpe_tokenizer.pad_token_id)
    results = {}
    for chunk in (0, 7):
        torch.manual_seed(0)
        model = tiny_model(bpe_tokenizer, seed=0)
        config = TrainConfig(
            data=dataset.data_dir, out=tmp_path / f"r{chunk}", device="cpu", batch_tokens=1024, progress=False, loss_chunk_tokens=chunk
        )
        trainer = SFTTrainer(model, dataset, None, config, tokenizer=bpe_tokenizer)
        trainer.autocast_dtype = torch.bfloat16  # what a GPU run uses
        loss = trainer.compute_loss(batch)
        loss.backward()
        results[chunk] = (loss.item(), model.get_input_embeddings().weight.grad.clone())
    assert results[7][0] == pytest.approx(results[0][0], rel=1e-2)
    cosine = torch.nn.functional.cosine_similarity(results[7][1].flatten(), results[0][1].flatten(), dim=0)
    assert cosine > 0.99
