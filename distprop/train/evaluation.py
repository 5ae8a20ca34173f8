"""Evaluation on the test split, summed over all ranks."""

from __future__ import annotations

import distprop.functional as F
from distprop.autograd import no_grad
from distprop.parallel import sum_metrics


def evaluate(model, loader, prepare, label: str, input_name: str, comm) -> dict:
    """Mean cross-entropy and accuracy over every rank's share of the test split.

    The split is sharded without dropping samples; where its size does not divide
    by the number of ranks, fewer than `ranks` samples are counted twice (the
    padding of torch's DistributedSampler)."""
    model.eval()
    loss = correct = count = 0.0
    with no_grad():
        for batch in loader:
            logits = model(prepare(batch[input_name]))
            targets = batch[label]
            loss += F.cross_entropy(logits, targets, reduction="sum").item()
            correct += float((logits.data.argmax(axis=1) == targets).sum())
            count += len(targets)
    model.train()
    totals = sum_metrics({"loss": loss, "correct": correct, "count": count}, comm)
    return {"test_loss": totals["loss"] / totals["count"], "test_accuracy": totals["correct"] / totals["count"]}
