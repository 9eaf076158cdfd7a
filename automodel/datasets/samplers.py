"""Length-grouped sampling: batches of similar length, so little of each batch is padding.

``LengthGroupedSampler`` draws a seeded permutation per epoch, cuts it into mega-batches of
``batch_size x world_size x mega_batch_mult`` samples, sorts each mega-batch by length and deals
it out as batches (longest first, so an out-of-memory error shows on the first step), then
shuffles the order of the batches. Each rank takes every ``world_size``-th batch. The sampler
is resumable: the loader saves ``state_dict()`` (epoch and samples yielded) and a restored
sampler continues with the same order.

``estimate_lengths`` gives the per-sample lengths cheaply: the text of each conversation (tokens
when a tokenizer is given, otherwise characters / 4) plus the image tokens, without decoding any
image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from automodel.models import families


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Shuffled indices in which each run of ``batch_size`` has similar lengths.

    Args:
        lengths: one length estimate per sample.
        batch_size: the per-rank (local) batch size the loader uses.
        rank: this process's data-parallel rank.
        world_size: the number of data-parallel ranks.
        seed: the run seed; epoch ``e`` uses a generator seeded with ``seed + e``.
        mega_batch_mult: how many batches per rank are sorted together (more: less padding,
            less randomness).
        drop_last: drop incomplete batches and the batches that would not reach every rank;
            otherwise the first batches are repeated so that every rank gets as many.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        mega_batch_mult: int = 16,
        drop_last: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.drop_last = drop_last
        self.epoch = 0
        self.yielded = 0
        self.next_yielded: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Selects the permutation of ``epoch`` (as ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch``, in order; rank r gets batches r, r + world_size, ..."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.batch_size * self.world_size * self.mega_batch_mult
        batches = []
        for start in range(0, len(order), mega):
            group = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            batches += [
                group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)
            ]
        # The longest batch goes first; the rest in random order.
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]], default=0)
        rest = [b for i, b in enumerate(batches) if i != longest]
        perm = torch.randperm(len(rest), generator=generator).tolist()
        ordered = batches[longest : longest + 1] + [rest[i] for i in perm]
        if self.drop_last:
            ordered = [b for b in ordered if len(b) == self.batch_size]
            return ordered[: len(ordered) // self.world_size * self.world_size]
        # Every rank gets the same number of batches (as DistributedSampler pads), so no rank
        # waits in a collective for one that has run out.
        short = -len(ordered) % self.world_size
        return ordered + ordered[:short]

    def rank_indices(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch``."""
        mine = self.batches(epoch)[self.rank :: self.world_size]
        return [i for batch in mine for i in batch]

    def __iter__(self) -> Iterator[int]:
        self.yielded = self.next_yielded or 0
        self.next_yielded = None
        indices = self.rank_indices(self.epoch)
        for i in indices[self.yielded :]:
            self.yielded += 1
            yield i
        self.epoch += 1
        self.yielded = 0

    def __len__(self) -> int:
        return len(self.rank_indices(self.epoch))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.next_yielded = state["yielded"]


def _conversation(dataset, idx: int) -> list[dict] | None:
    # ConversationDataset.conversation(i) reads the record without decoding its images.
    try:
        if hasattr(dataset, "conversation"):
            return dataset.conversation(idx)
        return dataset[idx]["conversation"]
    except Exception:  # noqa: BLE001 - an unreadable sample is screened and dropped elsewhere
        return None


def image_tokens_per_image(processor) -> int:
    """The fixed number of tokens an image becomes, where the processor says (else 0)."""
    return families.tokens_per_image(processor)


def estimate_lengths(dataset, processor=None) -> list[int]:
    """A cheap length per sample: text tokens (or characters / 4) plus image tokens.

    Args:
        dataset: a map-style dataset of ``{"conversation": ...}`` samples.
        processor: when given, its tokenizer counts the text and its image token count is added.

    Returns:
        One integer per sample (0 for a sample that cannot be read).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    per_image = image_tokens_per_image(processor) if processor is not None else 0
    texts, images = [], []
    for idx in range(len(dataset)):
        conversation = _conversation(dataset, idx) or []
        parts = [
            part
            for message in conversation
            for part in (
                message["content"]
                if isinstance(message.get("content"), list)
                else [{"type": "text", "text": message.get("content") or ""}]
            )
        ]
        texts.append(" ".join(p.get("text") or "" for p in parts if p.get("type") == "text"))
        images.append(sum(p.get("type") == "image" for p in parts))
    if tokenizer is not None and callable(tokenizer):
        counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    else:
        counts = [len(text) // 4 for text in texts]
    return [c + per_image * n for c, n in zip(counts, images)]


def make_sampler(
    dataset,
    *,
    train: bool,
    shuffle: bool,
    group_by_length: bool,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    processor=None,
):
    """The sampler of a training or evaluation loader, or None for the loader's own order.

    Training reads one permutation per epoch (seed + epoch, the same on every rank), each rank
    its share, so N processes see the global batches one process would; the sampler's position
    is part of the loader's state_dict, hence of every checkpoint. With ``group_by_length`` (and
    shuffling) the batches are of similar length: less compute on padding. Evaluation gives
    every sample once, to one rank.

    Args:
        dataset: the samples.
        train: a training loader (else evaluation).
        shuffle: shuffle the training order.
        group_by_length: batch samples of similar estimated length (training, shuffled).
        batch_size: the per-rank batch size.
        rank, world_size: this process's data-parallel rank and the number of ranks.
        seed: the base seed of the permutations.
        processor: for the length estimates (``estimate_lengths``).
    """
    if train and shuffle and group_by_length:
        lengths = estimate_lengths(dataset, processor)
        return LengthGroupedSampler(
            lengths, batch_size, rank=rank, world_size=world_size, seed=seed
        )
    if train:
        return StatefulDistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
        )
    if world_size > 1:
        return list(range(rank, len(dataset), world_size))
    return None
