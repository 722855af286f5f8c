"""Plain text that does not fit in memory: packed blocks read from a streamed table, on the fly.

:class:`TextStream` reads a ``datasets.IterableDataset`` row by row, tokenizes the text field a chunk
of rows at a time and packs the documents as in memory (``[bos] doc [eos]``, cut every ``seq_len``
tokens, :func:`~distillery.data.text.user.pack_blocks`). At most ``shuffle_buffer`` blocks are held:
the stream is read in windows of that many blocks, and each window is served in a shuffled order
(seeded by the seed, the pass and the window), so that neighbouring lines do not fill one batch.
When the stream ends, the next pass starts again from its first row (the data cycles).

The training loop asks for examples by index (``get_batch(indices)``, the indices of a step being
positions ``k*B .. (k+1)*B - 1`` of a permutation of ``range(len)``: the loop's batch plan).
:meth:`TextStream.view` gives the loop a dataset of exactly ``steps x batch_size`` examples and is
told that permutation (``order``), so it maps every index back to its place in the plan and serves
the stream in reading order: step ``k`` reads blocks ``k*B .. (k+1)*B - 1`` of the (shuffled,
cycled) stream. Reads therefore go forwards only; a request behind the current window (a resumed
run) re-reads the stream from its start up to that point, so a resumed run sees the same blocks as an
uninterrupted one. Indices in another order are still served correctly, only by re-reading.

What streaming does not do: it never knows how many blocks the stream holds in advance, so training
is given in ``steps`` (not ``epochs``), validation and test splits are files or row counts taken from
the head of the stream (not fractions), and ``max_train_blocks`` caps a pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from distillery.data.text.collate import encode_texts, pad_right, special_ids
from distillery.data.text.user import as_text
from distillery.errors import ConfigError

CHUNK_ROWS = 256  # rows tokenized per call


def stream_blocks(
    table: Any, field: str, tokenizer: Any, seq_len: int, where: str, max_blocks: int | None = None
) -> Iterator[list[int]]:
    """Packed blocks of one pass over a streamed table (at most ``max_blocks``); blank rows are skipped.

    Unlike :func:`~distillery.data.text.user.pack_blocks` on a whole list, a block may hold the end of
    one chunk of rows and the start of the next: the packing is the same as in memory.
    """
    _, bos_id, eos_id = special_ids(tokenizer)
    carry: list[int] = []
    served = 0
    chunk: list[str] = []

    def flush() -> Iterator[list[int]]:
        nonlocal carry, served
        ids = encode_texts(tokenizer, chunk)
        carry.extend(t for doc in ids for t in (bos_id, *doc, eos_id))
        while len(carry) >= seq_len:
            if max_blocks is not None and served >= max_blocks:
                return
            yield carry[:seq_len]
            carry = carry[seq_len:]
            served += 1

    for i, row in enumerate(table):
        if field not in row:
            raise ConfigError(
                f"{where}: row {i} (0-based) has no field {field!r}; its fields are {', '.join(row)}"
            )
        text = as_text(row[field], where, field, i)
        if text.strip():
            chunk.append(text)
        if len(chunk) >= CHUNK_ROWS:
            yield from flush()
            chunk = []
            if max_blocks is not None and served >= max_blocks:
                return
    if chunk:
        yield from flush()
    if len(carry) >= 2 and (max_blocks is None or served < max_blocks):
        yield carry


class TextStream:
    """Training blocks of a streamed text table (see the module docstring).

    Args:
        table: a ``datasets.IterableDataset`` (iterated afresh for every pass).
        field: the text field of its rows.
        tokenizer: encodes the text (pad, bos and eos ids set).
        seq_len: tokens per block.
        where: the config section, for messages.
        max_blocks: blocks per pass at most (None: the whole stream).
        shuffle_buffer: blocks per window (1: the reading order).
    """

    def __init__(
        self,
        table: Any,
        field: str,
        tokenizer: Any,
        seq_len: int,
        where: str,
        *,
        max_blocks: int | None = None,
        shuffle_buffer: int = 1024,
    ) -> None:
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        self.table, self.field, self.tokenizer = table, field, tokenizer
        self.seq_len, self.where = int(seq_len), where
        self.max_blocks, self.window = max_blocks, int(shuffle_buffer)
        self.pad_id = special_ids(tokenizer)[0]
        self.length: int | None = None  # blocks per pass, once a pass has ended

    def view(self, steps: int, batch_size: int, seed: int, order: Tensor | None = None) -> StreamedBlocks:
        """A dataset of ``steps * batch_size`` examples for a ``fit`` of that many steps.

        Args:
            steps, batch_size: of the ``fit`` that reads it.
            seed: seeds the shuffle of every window.
            order: the loop's permutation of the ``steps * batch_size`` indices (``order[j]`` is the index
                at place ``j`` of the plan; None: ``0, 1, 2, ...``).
        """
        return StreamedBlocks(self, steps, batch_size, seed, order)

    def first_blocks(self, n: int) -> list[list[int]]:
        """The first ``n`` blocks of the stream in reading order (fewer if it is shorter)."""
        out = []
        for block in stream_blocks(
            self.table, self.field, self.tokenizer, self.seq_len, self.where, self.max_blocks
        ):
            out.append(block)
            if len(out) >= n:
                break
        return out


class _Reader:
    """Forward reader of a :class:`TextStream`: the current pass, window and its shuffled order."""

    def __init__(self, stream: TextStream, seed: int) -> None:
        self.stream, self.seed = stream, seed
        self.blocks: Iterator[list[int]] | None = None
        self.pass_index, self.window_index = -1, -1
        self.window: list[list[int]] = []
        self.order: list[int] = []
        self.reads = 0  # passes started (a restart counts)

    def _restart(self, pass_index: int) -> None:
        s = self.stream
        self.blocks = stream_blocks(s.table, s.field, s.tokenizer, s.seq_len, s.where, s.max_blocks)
        self.pass_index, self.window_index, self.window = pass_index, -1, []
        self.reads += 1

    def _next_window(self) -> bool:
        """Read the next window of the current pass; False when the pass had ended."""
        window = []
        for block in self.blocks:
            window.append(block)
            if len(window) >= self.stream.window:
                break
        if not window:
            return False
        self.window_index += 1
        self.window = window
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.pass_index) * 1_000_003 + self.window_index
        )
        self.order = torch.randperm(len(window), generator=g).tolist()
        return True

    def block(self, position: int) -> list[int]:
        """The block at ``position`` of the shuffled, cycled stream."""
        s = self.stream
        while True:
            k, q = divmod(position, s.length) if s.length else (0, position)
            w, offset = divmod(q, s.window)
            if self.blocks is None or (k, w) < (self.pass_index, self.window_index) or k != self.pass_index:
                self._restart(k)
            while self.window_index < w:
                if not self._next_window():
                    break
            if self.window_index == w and offset < len(self.window):
                return self.window[self.order[offset]]
            # the pass ended before this position: now its length is known
            total = self.window_index * s.window + len(self.window) if self.window_index >= 0 else 0
            if total == 0:
                raise ConfigError(
                    f"{s.where}: the stream holds no text of at least 2 tokens; check the file and its field "
                    f"{s.field!r}"
                )
            if s.length is not None and s.length != total:
                raise RuntimeError(
                    f"the stream changed length between passes ({s.length} then {total} blocks)"
                )
            s.length = total
            self.blocks = None  # restart at the pass the position falls in


class StreamedBlocks:
    """``steps * batch_size`` training examples read from a :class:`TextStream` (the loop's dataset
    protocol: ``len`` and ``get_batch(indices)``; batches have ``input_ids``, ``attention_mask``,
    ``labels`` and ``index``)."""

    def __init__(
        self, stream: TextStream, steps: int, batch_size: int, seed: int, order: Tensor | None = None
    ) -> None:
        self.stream, self.steps, self.batch_size, self.seed = stream, int(steps), int(batch_size), int(seed)
        self.n = self.steps * self.batch_size
        if order is None:
            self.position = torch.arange(self.n)
        else:
            order = torch.as_tensor(order).long().reshape(-1)
            if len(order) != self.n or not torch.equal(order.sort().values, torch.arange(self.n)):
                raise ValueError(f"order must be a permutation of range({self.n})")
            self.position = torch.empty_like(order)
            self.position[order] = torch.arange(self.n)  # index -> its place in the plan
        self.reader = _Reader(stream, seed)

    def __len__(self) -> int:
        return self.n

    def get_batch(self, indices: Tensor) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices).long().reshape(-1)
        wanted = self.position[idx].tolist()
        rows: dict[int, list[int]] = {}
        for p in sorted(set(wanted)):  # forwards through the stream
            rows[p] = self.reader.block(p)
        return {**pad_right([rows[p] for p in wanted], None, self.stream.pad_id), "index": idx.clone()}

    def num_targets(self) -> int:
        """Targets of the examples (each block counted once per read; the last block of a pass may be shorter)."""
        return self.n * (self.stream.seq_len - 1)
