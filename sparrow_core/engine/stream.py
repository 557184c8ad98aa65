"""One live stream over a target: its KV cache, per-slot bookkeeping and kept hidden states.

Frames are prefilled as they arrive (`append_frames`), text as it is decided (`append_text`), so that
when a caption is due only decoding is left. The frames between two pieces of text are one clip, one
video of the checkpoint's chat template (`target.VideoClip`); text closes the open clip first
(`close_clip`: a Qwen frame still waiting for its temporal partner, LLaVA-OneVision's image_newline).
Every slot of the KV records its kind (visual / text / special), its position ids, its media time and
the frame it came from.

Hidden states. For every non-visual slot (text, and the frames' separator tokens) the stream keeps the
target's hidden states at a few layers (default: last, penultimate and L/2). The drafter reads them:
its input at text position t fuses embed(token_t) with h_target(t-1), and the slot before a text token
is always text or a frame separator, never a bare visual token. Visual slots' L/2 hidden states are
kept only on request (drafter training, IVSB).

Bounded memory. With a visual-token budget, once the frames' slots exceed it the oldest frames are
evicted whole (KV compacted, see kv_cache.py); text slots stay unless their owner evicts a span of them
(`evict_text`: the caption history, see caption_history.py). Positions never change, so the next text
token continues after the largest position ever used. Memory is O(budget + text kept).

Devices. The KV and the kept hidden states live on the model's device, in its dtype; the per-slot
bookkeeping (ids, kinds, positions, times, frames, slot indices) lives on the CPU, and every tensor made here
says which (tests/test_device_hygiene.py holds the engine to that).

This module is over 400 lines on purpose: every edit of a stream (append, tree, accept, rollback,
eviction) moves the KV, the per-slot bookkeeping and the kept hidden states together, in one class, so
that they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from sparrow_core.engine.kv_cache import StreamKVCache, common_prefix
from sparrow_core.engine.layout import TokenKind
from sparrow_core.engine.preprocess import validate_frames
from sparrow_core.engine.ragged import StreamForward, forward_streams
from sparrow_core.engine.target import FrameBlock, TargetModel, VideoClip


class StreamClosedError(RuntimeError):
    pass


@dataclass
class StreamConfig:
    visual_token_budget: int | None = None  # max frame slots kept in the KV; None = unbounded
    evict_slack: float = 0.0  # on eviction, go this fraction of the budget below it (amortises compaction)
    hidden_layers: tuple[int | str, ...] = ("last", "penultimate", "mid")
    keep_visual_mid_hidden: bool = False
    keep_visual_embeds: bool = False  # keep frame slots' raw LM input embeddings (the msd drafter reads them)
    initial_capacity: int = 1024
    max_slots: int | None = None  # an append that would take the KV past this many slots raises ValueError
    kv_dtype: torch.dtype | None = None  # the KV's dtype (kv_cache.py); None = the target's kv_dtype

    def with_needs(self, needs: StreamNeeds) -> StreamConfig:
        """This config, also keeping what `needs` asks for."""
        return replace(
            self,
            keep_visual_embeds=self.keep_visual_embeds or needs.visual_embeds,
            keep_visual_mid_hidden=self.keep_visual_mid_hidden or needs.visual_mid_hidden,
        )


@dataclass(frozen=True)
class StreamNeeds:
    """What a decoder needs its streams to keep beyond the default (StreamConfig's keep_* fields)."""

    visual_embeds: bool = False  # frame slots' raw LM input embeddings (the msd drafter's visual span)
    visual_mid_hidden: bool = False  # visual slots' L/2 hidden states (a "mid_hidden" visual span)

    def __or__(self, other: StreamNeeds) -> StreamNeeds:
        return StreamNeeds(self.visual_embeds or other.visual_embeds, self.visual_mid_hidden or other.visual_mid_hidden)


class _Rows:
    """A growable tensor along dim 0 (preallocated, doubling), with crop and keep like the KV."""

    def __init__(self, shape_tail: tuple[int, ...], dtype: torch.dtype, device, capacity: int = 256) -> None:
        self.buf = torch.empty((capacity, *shape_tail), dtype=dtype, device=device)
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        m = rows.shape[0]
        if self.n + m > self.buf.shape[0]:
            new = self.buf.new_empty((max(self.n + m, 2 * self.buf.shape[0]), *self.buf.shape[1:]))
            new[: self.n] = self.buf[: self.n]
            self.buf = new
        self.buf[self.n : self.n + m] = rows.to(self.buf.device, self.buf.dtype)
        self.n += m

    def view(self) -> torch.Tensor:
        return self.buf[: self.n]

    def truncate(self, n: int) -> None:
        self.n = n

    def keep(self, index: torch.Tensor, prefix: int | None = None) -> None:
        p = common_prefix(index) if prefix is None else prefix
        kept = self.buf.index_select(0, index[p:].to(self.buf.device))
        self.buf[p : p + kept.shape[0]] = kept
        self.n = p + kept.shape[0]


@dataclass
class StreamStats:
    slots: int
    frame_slots: int
    text_slots: int
    frames_ingested: int
    frame_slots_evicted: int
    frames_evicted: int
    text_slots_evicted: int
    kv_bytes: int
    next_position: int
    media_time_s: float


@dataclass
class HiddenView:
    """Kept hidden states of non-visual slots: `slots[i]` is the KV slot of row i."""

    slots: torch.Tensor  # [T] int64
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [T, H]


class TargetStream:
    def __init__(self, target: TargetModel, config: StreamConfig | None = None) -> None:
        config = config or StreamConfig()
        self.target = target
        self.config = config
        self.hidden_layers = sorted({target.layers.resolve(x) for x in config.hidden_layers})
        self.mid_layer = target.layers.resolve("mid")
        # the hidden-state indices every forward hands back (stream_forward's `keep`)
        self._keep_hidden = set(self.hidden_layers) | ({self.mid_layer} if config.keep_visual_mid_hidden else set())
        dev = target.device
        cap = config.initial_capacity
        self.cache = StreamKVCache(target.num_layers, cap, config.kv_dtype or target.kv_dtype)
        # per-slot bookkeeping, slot order
        self._ids = _Rows((), torch.long, "cpu", cap)
        self._kinds = _Rows((), torch.uint8, "cpu", cap)
        self._pos = _Rows((target.position_rows,), torch.long, "cpu", cap)
        self._time = _Rows((), torch.float64, "cpu", cap)
        self._frame = _Rows((), torch.long, "cpu", cap)  # global frame number, -1 for text
        # kept hidden states: non-visual slots at `hidden_layers`; visual slots at L/2 on request
        self._hid_slot = _Rows((), torch.long, "cpu", cap)
        self._hid = _Rows((len(self.hidden_layers), target.hidden_size), target.dtype, dev, cap)
        self._vis_slot = _Rows((), torch.long, "cpu", cap)
        self._vis_hid = _Rows((target.hidden_size,), target.dtype, dev, cap if config.keep_visual_mid_hidden else 1)
        self._emb_slot = _Rows((), torch.long, "cpu", cap)
        self._emb = _Rows((target.hidden_size,), target.dtype, dev, cap if config.keep_visual_embeds else 1)
        self.next_position = 0
        self.frames_ingested = 0
        self.frame_slots_evicted = 0
        self.frames_evicted = 0
        self.text_slots_evicted = 0
        self.media_time_s = 0.0
        self.clip: VideoClip | None = None  # the clip frames are being appended to (None after text)
        self.closed = False

    # --- introspection -----------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self._ids.n

    def token_ids(self) -> torch.Tensor:
        return self._ids.view()

    def kinds(self) -> torch.Tensor:
        return self._kinds.view()

    def text_slots(self) -> torch.Tensor:
        """[T] the text slots in KV order. Found among the non-visual slots (whose hidden states the stream
        keeps, every one), so the cost follows the text, not the video: what a drafter reads per step."""
        hs = self._hid_slot.view()
        return hs[self._kinds.view()[hs] == int(TokenKind.TEXT)]

    def positions(self) -> torch.Tensor:
        """[P, S] position ids of the slots in KV order."""
        return self._pos.view().T

    def media_times(self) -> torch.Tensor:
        return self._time.view()

    def frame_ids(self) -> torch.Tensor:
        return self._frame.view()

    @property
    def slots_evicted(self) -> int:
        """Slots evicted so far (frames and text): it changes exactly when the stream has new holes."""
        return self.frame_slots_evicted + self.text_slots_evicted

    def frame_slot_count(self) -> int:
        return int((self._frame.view() >= 0).sum())

    def hidden(self) -> HiddenView:
        rows = self._hid.view()
        return HiddenView(
            slots=self._hid_slot.view(),
            layers={layer: rows[:, i] for i, layer in enumerate(self.hidden_layers)},
        )

    def visual_mid_hidden(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [V], L/2 hidden states [V, H]) of visual slots; needs keep_visual_mid_hidden."""
        if not self.config.keep_visual_mid_hidden:
            raise RuntimeError("stream was opened without keep_visual_mid_hidden")
        return self._vis_slot.view(), self._vis_hid.view()

    def visual_embeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [F], raw LM input embeddings [F, H]) of frame slots; needs keep_visual_embeds."""
        if not self.config.keep_visual_embeds:
            raise RuntimeError("stream was opened without keep_visual_embeds")
        return self._emb_slot.view(), self._emb.view()

    def stats(self) -> StreamStats:
        frame_slots = self.frame_slot_count()
        return StreamStats(
            slots=self.length,
            frame_slots=frame_slots,
            text_slots=self.length - frame_slots,
            frames_ingested=self.frames_ingested,
            frame_slots_evicted=self.frame_slots_evicted,
            frames_evicted=self.frames_evicted,
            text_slots_evicted=self.text_slots_evicted,
            kv_bytes=self.cache.nbytes(),
            next_position=self.next_position,
            media_time_s=self.media_time_s,
        )

    # --- appending ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise StreamClosedError("stream is closed")

    def _slots_forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        ids: torch.Tensor,
        kinds: torch.Tensor,
        times: torch.Tensor,
        frames: torch.Tensor,
        **how,
    ) -> StreamForward:
        """n new slots as a forward to run (`how`: StreamForward's tree_mask / wants_logits / after); ValueError
        when they would take the KV past its limit (nothing has changed then)."""
        start, n = self.length, ids.numel()
        limit = self.config.max_slots
        if limit is not None and start + n > limit:
            raise ValueError(
                f"the stream's KV would hold {start + n} tokens ({start} + {n}), over its limit of {limit} tokens"
            )
        return StreamForward(self, embeds, positions, ids, kinds, times, frames, **how)

    def run_forward(self, forward: StreamForward) -> StreamForward:
        """Run one of this stream's forwards alone (`ragged.forward_streams` of one); returns it."""
        forward_streams(self.target, [forward])
        return forward

    def record_forward(self, forward: StreamForward, last: torch.Tensor | None,
                       hidden: dict[int, torch.Tensor] | None) -> None:
        """After a forward ran `forward`'s slots (their keys and values are in the cache): record the slots,
        keep their hidden states (last [n, H]; hidden: index -> [n, H] for `hidden_keep`), then the
        forward's own follow-up."""
        n, start = forward.size, self.length
        if n:
            kinds = forward.kinds
            self._ids.append(forward.ids)
            self._kinds.append(kinds)
            self._pos.append(forward.positions.T)
            self._time.append(forward.times)
            self._frame.append(forward.frames)
            keep = kinds != int(TokenKind.VISUAL)
            n_keep = int(keep.sum())
            if n_keep:
                rows = torch.stack([hidden[layer] for layer in self.hidden_layers], dim=1)  # [n, k, H]
                if n_keep == n:  # text: every slot's hidden states are kept
                    self._hid_slot.append(torch.arange(start, start + n, device="cpu"))
                    self._hid.append(rows)
                else:
                    idx = keep.nonzero().squeeze(1)
                    self._hid_slot.append(idx + start)
                    self._hid.append(rows[idx.to(rows.device)])
            if self.config.keep_visual_mid_hidden and n_keep < n:
                idx = (~keep).nonzero().squeeze(1)
                self._vis_slot.append(idx + start)
                self._vis_hid.append(hidden[self.mid_layer][idx.to(last.device)])
        if forward.after is not None:
            forward.after()

    @property
    def hidden_keep(self) -> set[int]:
        """The hidden-state indices a forward must hand back for this stream (`TargetModel.stream_forward`'s
        `keep`)."""
        return self._keep_hidden

    def append_frames(self, frames, timestamps) -> int:
        """Prefill a chunk of uint8 RGB frames [N, H, W, 3] taken at `timestamps` (media seconds).

        The frames join the stream's open clip (one video of the chat template), or open one after text.
        Returns the number of KV slots the chunk took (an adapter may hold frames back, see qwen_vl.py).
        Raises ValueError on bad input; the stream is left exactly as it was.
        """
        return self.run_forward(self.frames_forward(frames, timestamps)).size

    def frames_forward(self, frames, timestamps) -> StreamForward:
        """`append_frames` as a forward to run: the frames are checked and laid out now, then encoded (vision
        tower, with the other frames of the same ragged forward: `ragged.forward_streams`) and their slots
        prefilled by the forward (possibly none: held frames), the stream updated when it is recorded."""
        self._check_open()
        frames = validate_frames(frames, list(timestamps))
        ts = torch.tensor([float(t) for t in timestamps], dtype=torch.float64, device="cpu")
        if ts[0].item() < self.media_time_s:
            raise ValueError(
                f"frame timestamp {ts[0].item():.3f}s is earlier than the stream's media time {self.media_time_s:.3f}s"
            )
        n = frames.shape[0]
        before = self.clip
        self.clip = before.copy() if before is not None else VideoClip(self.next_position, float(ts[0]), next_position=self.next_position)
        frame_no = torch.arange(self.frames_ingested, self.frames_ingested + n, device="cpu")

        def ingested() -> None:
            self.frames_ingested += n
            self.media_time_s = float(ts[-1])
            self._evict_to_budget()

        try:
            with torch.no_grad():
                block = self.target.encode_frames(frames, ts, frame_no, self.clip)
            self.clip.last_frame, self.clip.last_time = int(frame_no[-1]), float(ts[-1])
            return self._block_forward(block, then=ingested)
        except ValueError:
            self.clip = before  # a refused append leaves the clip as it was too
            raise

    def _block_forward(self, block: FrameBlock | None, then: Callable[[], None] | None = None) -> StreamForward:
        """A frame block's slots as a forward (none for no block); when recorded, the stream's position
        moves past the clip so far, then `then`."""
        if block is None:
            empty = torch.zeros(0, dtype=torch.long, device="cpu")
            block = FrameBlock(torch.zeros(0, self.target.hidden_size, dtype=self.target.dtype, device=self.target.device),
                               empty, empty.to(torch.uint8), empty, empty.to(torch.float64),
                               torch.zeros(self.target.position_rows, 0, dtype=torch.long, device="cpu"))
        start, clip = self.length, self.clip

        def recorded() -> None:
            if block.size:
                if self.config.keep_visual_embeds:
                    self._emb_slot.append(torch.arange(start, self.length, device="cpu"))
                    self._emb.append(forward.embeds)  # the tower's, set by the forward
                self.next_position = clip.next_position
            if then is not None:
                then()

        forward = self._slots_forward(block.embeds, block.positions, block.token_ids, block.kinds, block.times,
                                      block.frame_no, after=recorded, vision=block.vision)
        return forward

    def close_clip(self) -> int:
        """End the open clip, if any: its closing slots (held frames, its separator) go into the KV, and
        the next frame opens a new clip. Text does this itself before it is appended. Returns slots taken."""
        self._check_open()
        if self.clip is None:
            return 0
        before, self.clip = self.clip, self.clip.copy()
        try:
            with torch.no_grad():
                taken = self.run_forward(self._block_forward(self.target.close_clip(self.clip))).size
        except ValueError:
            self.clip = before
            raise
        self.clip = None
        self._evict_to_budget()
        return taken

    def append_text(self, token_ids) -> torch.Tensor:
        """Prefill text tokens; return the next-token logits after the last one, fp32 [V]."""
        return self.append_text_all(token_ids)[-1]

    def append_text_all(self, token_ids) -> torch.Tensor:
        """Prefill text tokens; return the logits after each of them, fp32 [n, V]."""
        return self.run_forward(self.text_forward(token_ids)).logits

    def text_forward(self, token_ids) -> StreamForward:
        """`append_text_all` as a forward to run (its `logits` [n, V] are set by it). The open clip is
        closed now (a forward of its own, where it has closing slots)."""
        self._check_open()
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device="cpu")
        if ids.numel() == 0:
            raise ValueError("append_text needs at least one token")
        if int(ids.min()) < 0 or int(ids.max()) >= self.target.vocab_size:
            raise ValueError(f"token ids must lie in 0..{self.target.vocab_size - 1}")
        self.close_clip()  # text after frames ends their clip
        positions, next_pos = self.target.text_positions(ids.numel(), self.next_position)

        def advance() -> None:
            self.next_position = next_pos

        return self._text_slots(ids, positions, after=advance)

    def _text_slots(self, ids: torch.Tensor, positions: torch.Tensor, **how) -> StreamForward:
        """Text slots ids [n] at positions [P, n], at the stream's media time, as a forward that wants
        the logits after each."""
        n = ids.numel()
        with torch.no_grad():
            embeds = self.target.embed_tokens(ids.to(self.target.device))
        return self._slots_forward(
            embeds,
            positions,
            ids,
            torch.full((n,), int(TokenKind.TEXT), dtype=torch.uint8, device="cpu"),
            torch.full((n,), self.media_time_s, dtype=torch.float64, device="cpu"),
            torch.full((n,), -1, dtype=torch.long, device="cpu"),
            wants_logits=True,
            **how,
        )

    # --- draft trees ------------------------------------------------------------------------
    def append_tree(self, token_ids, depths, tree_mask: torch.Tensor) -> torch.Tensor:
        """Prefill a draft tree of Q text tokens in one forward; return the logits after each node, fp32 [Q, V].

        `depths[i]` is node i's depth below the stream's last token (0 = the node right after it), so
        node i takes position next_position + depths[i]. `tree_mask` [Q, Q] bool: node i sees node j iff
        tree_mask[i, j] (its ancestors and itself). Every node sees the whole stream. The nodes occupy the
        last Q slots until `accept_tree` keeps a path and drops the rest.
        """
        return self.run_forward(self.tree_forward(token_ids, depths, tree_mask)).logits

    def tree_forward(self, token_ids, depths, tree_mask: torch.Tensor) -> StreamForward:
        """`append_tree` as a forward to run (its `logits` [Q, V] are set by it)."""
        self._check_open()
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device="cpu")
        q = ids.numel()
        depth = torch.as_tensor(list(depths), dtype=torch.long, device="cpu")
        if q == 0 or depth.numel() != q or tuple(tree_mask.shape) != (q, q):
            raise ValueError(f"a tree of {q} nodes needs {q} depths and a [{q}, {q}] mask")
        self.close_clip()
        positions = (self.next_position + depth).unsqueeze(0).expand(self.target.position_rows, q).clone()
        # every node sees the whole stream (slots < its length) and the tree nodes its mask row allows
        return self._text_slots(ids, positions, tree_mask=tree_mask.to(self.target.device, torch.bool))

    def accept_tree(self, tree_size: int, accepted: list[int]) -> None:
        """Keep the accepted nodes (indices into the last `tree_size` slots, root first) and drop the rest.

        The kept nodes must form a path of depths 0, 1, 2, ...: they then sit at consecutive positions.
        """
        if tree_size > self.length:
            raise ValueError(f"tree of {tree_size} nodes is larger than the stream ({self.length})")
        base = self.length - tree_size
        if list(accepted) == list(range(len(accepted))):  # the path is the tree's first nodes (a chain): drop the tail
            self._truncate(base + len(accepted))
        else:
            keep = torch.cat([torch.arange(base, device="cpu"), base + torch.as_tensor(accepted, dtype=torch.long, device="cpu")])
            self.keep_slots(keep, prefix=base + common_prefix(torch.as_tensor(accepted, dtype=torch.long, device="cpu")))
        self.next_position += len(accepted)

    # --- removing ----------------------------------------------------------------------------
    def rollback(self, n: int) -> None:
        """Drop the last n slots, which must be text (rejected draft tokens, a caption turn taken back;
        frames leave a stream only by eviction). The next text takes the first dropped slot's position,
        and nothing else the stream counts changes."""
        self._check_open()
        if n < 0 or n > self.length:
            raise ValueError(f"cannot roll back {n} slots of a stream of {self.length}")
        if n == 0:
            return
        new_len = self.length - n
        if bool((self._kinds.view()[new_len:] != int(TokenKind.TEXT)).any()):
            raise ValueError(f"rollback drops text slots only; the last {n} slots include frame slots")
        self.next_position = int(self._pos.view()[new_len, 0])
        self._truncate(new_len)

    def _truncate(self, new_len: int) -> None:
        """Drop every slot from `new_len` on: KV, bookkeeping and kept hidden states (positions untouched)."""
        self.cache.crop(new_len - self.length)
        for rows in (self._ids, self._kinds, self._pos, self._time, self._frame):
            rows.truncate(new_len)
        for slot_rows, data in ((self._hid_slot, self._hid), (self._vis_slot, self._vis_hid), (self._emb_slot, self._emb)):
            # slot numbers ascend along the rows: the first row at or past new_len starts the dropped tail
            keep_n = int(torch.searchsorted(slot_rows.view(), new_len))
            slot_rows.truncate(keep_n)
            data.truncate(keep_n)

    def keep_slots(self, slot_index: torch.Tensor, prefix: int | None = None) -> None:
        """Compact the stream to `slot_index` (sorted, unique): KV, bookkeeping and hidden states.
        `prefix`: `kv_cache.common_prefix(slot_index)` where the caller knows it."""
        slot_index = slot_index.to(torch.long).cpu()
        prefix = common_prefix(slot_index) if prefix is None else prefix
        self.cache.keep(slot_index, prefix)  # the cache moves the index to its buffers
        for rows in (self._ids, self._kinds, self._pos, self._time, self._frame):
            rows.keep(slot_index, prefix)
        for slot_rows, data in ((self._hid_slot, self._hid), (self._vis_slot, self._vis_hid), (self._emb_slot, self._emb)):
            if slot_rows.n == 0:
                continue
            old = slot_rows.view()
            pos_in_new = torch.searchsorted(slot_index, old)
            hit = (pos_in_new < slot_index.numel()) & (
                slot_index[pos_in_new.clamp(max=max(slot_index.numel() - 1, 0))] == old
            )
            rows_kept = hit.nonzero().squeeze(1)
            data.keep(rows_kept)
            new_slots = pos_in_new[rows_kept]
            slot_rows.truncate(0)
            slot_rows.append(new_slots)

    def evict_frames_before(self, frame_no: int) -> int:
        """Evict every slot of frames numbered < frame_no (frames leave oldest first, so afterwards
        exactly frames 0..frame_no-1 are gone); returns slots evicted."""
        frames = self._frame.view()
        drop = (frames >= 0) & (frames < frame_no)
        n_drop = int(drop.sum())
        if n_drop == 0:
            return 0
        self.keep_slots((~drop).nonzero().squeeze(1))
        self.frame_slots_evicted += n_drop
        self.frames_evicted = max(self.frames_evicted, frame_no)
        return n_drop

    def evict_text(self, first_position: int, end_position: int) -> int:
        """Evict every non-visual slot at positions [first_position, end_position); returns slots evicted.

        For spans of text whose owner knows they are no longer needed (earlier caption turns). Visual
        slots in the range are left to the visual budget. Nothing else moves: later slots keep their KV
        (computed while the span was visible, as after a frame eviction) and their positions.
        """
        pos = self._pos.view()[:, 0]
        drop = (self._kinds.view() != int(TokenKind.VISUAL)) & (pos >= first_position) & (pos < end_position)
        n_drop = int(drop.sum())
        if n_drop == 0:
            return 0
        self.keep_slots((~drop).nonzero().squeeze(1))
        self.text_slots_evicted += n_drop
        return n_drop

    def _evict_to_budget(self) -> None:
        budget = self.config.visual_token_budget
        if budget is None:
            return
        frames = self._frame.view()
        frame_slots = frames[frames >= 0]
        if frame_slots.numel() <= budget:
            return
        target = int(budget * (1.0 - self.config.evict_slack))
        # frame numbers ascend along slots; evict the oldest frames until at most `target` slots remain
        ids, counts = torch.unique_consecutive(frame_slots, return_counts=True)
        remaining = frame_slots.numel() - torch.cumsum(counts, 0)  # slots left after evicting ids[:i+1]
        first_ok = int((remaining <= target).nonzero()[0])
        # up to the first frame that keeps slots: a unit's slots carry its first frame's number (a Qwen
        # temporal patch is two frames), so every frame before the next kept unit goes with them
        survivor = int(ids[first_ok + 1]) if first_ok + 1 < ids.numel() else self.frames_ingested
        self.evict_frames_before(survivor)

    def close(self) -> None:
        """Free the stream's memory; later appends raise StreamClosedError."""
        self.closed = True
        self.cache = StreamKVCache(0)
        for rows in (self._ids, self._kinds, self._pos, self._time, self._frame, self._hid_slot, self._vis_slot, self._emb_slot):
            rows.truncate(0)
        self._hid = _Rows((len(self.hidden_layers), self.target.hidden_size), self.target.dtype, "cpu", 1)
        self._vis_hid = _Rows((self.target.hidden_size,), self.target.dtype, "cpu", 1)
        self._emb = _Rows((self.target.hidden_size,), self.target.dtype, "cpu", 1)
