"""Captioning sessions: the model-side API that the service, the offline CLI and the benchmarks drive.

`CaptionEngine` is loaded once per process and owns the target, its drafters and the decoders built on
them (`decoding/decoders.py`). A `CaptionSession` is one stream: `ingest` prefills frames as they arrive
(the caller samples them: `timeline.Timeline`), `caption_steps` decodes the caption of the media since
the previous caption, one target forward per yield, so a scheduler can interleave many sessions on one
model. Sessions are not thread-safe: one worker drives them all.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sparrow_core.decoding.decoders import AUTO, Decoder, DecodeSteps, build_decoders
from sparrow_core.decoding.drafter import TextAnchoredDrafter, load_drafter
from sparrow_core.decoding.metrics import DecodeMetrics
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.decoding.speculative import draft_together
from sparrow_core.decoding.tree_policy import PROFILE_NAME, DeviceProfile
from sparrow_core.engine.caption_history import CaptionHistory, CaptionTurn
from sparrow_core.engine.checkpoint import load_target
from sparrow_core.engine.ragged import StreamForward, run_steps
from sparrow_core.engine.stream import StreamConfig, StreamStats, TargetStream
from sparrow_core.engine.target import TargetModel

STREAM_DEFAULTS_FILE = "sparrow_stream.json"
# the drafters a checkpoint ships beside it (method name -> subdirectory), loaded unless told otherwise
DEFAULT_DRAFTER_DIRS = {"sparrow": "drafter", "eagle": "drafter-eagle", "msd": "drafter-msd"}


# A checkpoint whose sparrow_stream.json does not set caption_history keeps this many earlier turns (fewer
# when the context is too short for them, see CaptionEngine.derive_defaults).
DERIVED_CAPTION_HISTORY = 4


@dataclass(frozen=True)
class StreamDefaults:
    """How a checkpoint wants to be fed: its `sparrow_stream.json` (written next to the default model by
    its trainer), with the memory bounds the file leaves out derived from the checkpoint's context
    (`CaptionEngine.derive_defaults`). The one place for these defaults: sessions, the CLIs and the
    service fall back to them."""

    sampling_fps: float = 0.0  # 0 = every frame
    caption_every_s: float = 4.0
    visual_token_budget: int | None = None  # frame slots kept in the KV; None: derived; 0: unbounded
    caption_history: int | None = None  # earlier caption turns kept in the KV; None: derived; 0: all
    max_caption_tokens: int = 48

    @classmethod
    def for_model(cls, model_dir: Path | None) -> StreamDefaults:
        """The checkpoint's sparrow_stream.json as written (absent fields: the defaults above)."""
        path = Path(model_dir) / STREAM_DEFAULTS_FILE if model_dir is not None else None
        if path is None or not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))


@dataclass
class SessionConfig:
    instruction: str | None = None  # None -> the model's default instruction
    max_caption_tokens: int | None = None  # None: the model's default (engine.defaults)
    temperature: float = 0.0
    top_p: float = 1.0
    decoding: str = "auto"  # a name in CaptionEngine.decoders, or "auto" (sparrow when a drafter is loaded)
    visual_token_budget: int | None = None  # None: the model's default (engine.defaults); 0: no budget
    caption_history: int | None = None  # earlier caption turns kept; None: the model's default; 0: all
    seed: int = 0
    # The stream's KV may never hold more than this many bytes: a config whose worst case is over it is
    # refused (ValueError), and any append past it raises. None: no limit.
    max_kv_bytes: int | None = None


@dataclass
class EngineInfo:
    model_name: str
    architecture: str
    num_layers: int
    hidden_size: int
    frame_size: tuple[int, int] | None
    tokens_per_frame: int | None
    has_drafter: bool
    decoding_methods: list[str]


@dataclass
class CaptionProgress:
    text: str  # verified caption text so far; never revised within a caption
    draft_tail: str  # unverified drafted continuation ("" for ar)
    done: bool
    start_s: float  # media span the caption covers
    end_s: float
    tokens: int  # verified tokens so far
    tau: float | None  # tokens per target forward so far (bonus token included): DecodeMetrics.tau


def load_tree_profile(target: TargetModel, path: str | Path | None = None) -> DeviceProfile | None:
    """The profile at `path` (ValueError when it is not one, or was measured on another device or dtype
    than the target runs on), or, when `path` is None, the checkpoint's own (`tree_profile.json` beside
    it) if it has one measured for the target's device and dtype (another is passed over with a warning).
    None: no profile, every drafter grows its own tree."""
    if path is not None:
        profile = DeviceProfile.load(path)
        profile.check_runs_on(target.device, target.dtype, f"--tree-profile {path}")
        return profile
    own = target.path / PROFILE_NAME if target.path is not None else None
    if own is None or not own.is_file():
        return None
    profile = DeviceProfile.load(own)
    try:
        profile.check_runs_on(target.device, target.dtype, str(own))
    except ValueError as exc:
        warnings.warn(f"{exc}; the drafters grow their own trees", stacklevel=2)
        return None
    return profile


class CaptionEngine:
    def __init__(self, target: TargetModel, drafters: Mapping[str, TextAnchoredDrafter] | None = None,
                 tree_profile: DeviceProfile | None = None) -> None:
        """`drafters`: method name -> drafter; `tree_profile`: the measured device profile the drafters'
        trees are sized from (see `build_decoders`; None: each drafter's own tree)."""
        self.target = target
        self.drafters = dict(drafters or {})
        if tree_profile is not None:
            tree_profile.check_runs_on(target.device, target.dtype)
        self.tree_profile = tree_profile
        self.decoders: dict[str, Decoder] = build_decoders(self.drafters, tree_profile)
        self.defaults = self.derive_defaults(StreamDefaults.for_model(target.path))

    @classmethod
    def load(
        cls,
        model_dir: str | Path | None = None,
        drafters: Mapping[str, str | Path] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        shipped_drafters: bool = True,
        tree_profile: str | Path | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> CaptionEngine:
        """`model_dir=None` loads the embedded default model. `drafters`: method name -> drafter directory;
        with `shipped_drafters`, the checkpoint's own drafters (`DEFAULT_DRAFTER_DIRS`) load too, under the
        names not given. The target loads on `device` in `dtype` (None: `checkpoint.default_dtype`); drafters
        follow it. `tree_profile`: a `sparrow-bench calibrate` profile (None: the checkpoint's own
        `tree_profile.json` when it has one, else every drafter keeps its own tree). `kv_dtype`: the streams'
        KV dtype (`--kv-dtype`; None: the target's dtype)."""
        target = load_target(model_dir, device=device, dtype=dtype, kv_dtype=kv_dtype)
        dirs: dict[str, Path] = {}
        if shipped_drafters and target.path is not None:
            dirs = {name: target.path / sub for name, sub in DEFAULT_DRAFTER_DIRS.items() if (target.path / sub).is_dir()}
        dirs.update({name: Path(d) for name, d in (drafters or {}).items()})
        profile = load_tree_profile(target, tree_profile)
        return cls(target, {name: load_drafter(d, target) for name, d in dirs.items()}, profile)

    @property
    def info(self) -> EngineInfo:
        t = self.target
        size = t.image_size
        return EngineInfo(
            model_name=t.name(),
            architecture=t.architecture,
            num_layers=t.num_layers,
            hidden_size=t.hidden_size,
            frame_size=(size, size) if size else None,
            tokens_per_frame=t.tokens_per_frame,
            has_drafter=bool(self.drafters),
            decoding_methods=sorted(self.decoders),
        )

    def resolve_decoding(self, name: str) -> str:
        if name == AUTO:
            return "sparrow" if "sparrow" in self.decoders else "ar"
        if name not in self.decoders:
            raise ValueError(f"decoding method {name!r} is not available; available: {', '.join(sorted(self.decoders))}")
        return name

    def visual_token_budget(self, config: SessionConfig) -> int | None:
        """The frame slots a session keeps in its KV (None: unbounded)."""
        budget = self.defaults.visual_token_budget if config.visual_token_budget is None else config.visual_token_budget
        return budget or None

    def caption_history(self, config: SessionConfig) -> int | None:
        """The earlier caption turns a session keeps in its KV (None: all of them)."""
        keep = self.defaults.caption_history if config.caption_history is None else config.caption_history
        return keep or None

    def max_caption_tokens(self, config: SessionConfig) -> int:
        """The most tokens a caption of a session decodes."""
        return config.max_caption_tokens or self.defaults.max_caption_tokens

    def _turn_slots(self, instruction: str | None, max_caption_tokens: int, tree: int) -> int:
        """The most KV slots one caption turn takes: its prefix (the instruction, where the chat template
        puts it there), max_caption_tokens, end token and suffix, and the draft tree (`tree` slots, root
        included) a speculative step appends before it keeps the accepted path. A turn re-laid at close
        (`CaptionTurn.close`) holds its longer opening."""
        layout = self.target.caption_layout(instruction)
        opening = max(len(layout.prefix), len(layout.finished_prefix))
        return opening + max_caption_tokens + 1 + len(layout.suffix) + tree - 1

    def _slots_beside_frames(self, instruction: str | None, history: int, max_caption_tokens: int, tree: int) -> int:
        """The KV slots a stream holds besides its kept frames, at most: prompt + one frame (a frame is
        prefilled before the oldest are evicted) + (history + 1) caption turns."""
        t = self.target
        prompt = len(t.caption_layout(instruction).preamble)
        return prompt + t.max_tokens_per_frame + (history + 1) * self._turn_slots(instruction, max_caption_tokens, tree)

    def derive_defaults(self, written: StreamDefaults) -> StreamDefaults:
        """`written` (the checkpoint's sparrow_stream.json) with a caption history and a visual budget where
        it sets none, derived from the checkpoint's context length C: DERIVED_CAPTION_HISTORY turns (fewer
        if they would take over half of C), and every slot of C the prompt, one frame and the kept turns
        (with the largest draft tree of any decoder) leave, so a stream's worst-case KV is C tokens."""
        context = self.target.context_length
        tree = max(d.max_tree_tokens for d in self.decoders.values())
        history = written.caption_history
        if history is None:
            per_turn = self._turn_slots(None, written.max_caption_tokens, tree)
            history = max(1, min(DERIVED_CAPTION_HISTORY, context // 2 // per_turn - 1))
        budget = written.visual_token_budget
        if budget is None:
            budget = context - self._slots_beside_frames(None, history, written.max_caption_tokens, tree)
            if budget < self.target.max_tokens_per_frame:
                raise ValueError(
                    f"the checkpoint's context of {context} tokens leaves no room for a frame beside "
                    f"{history} caption turns; set visual_token_budget and caption_history in {STREAM_DEFAULTS_FILE}"
                )
        return replace(written, visual_token_budget=budget, caption_history=history)

    def describe_defaults(self, config: SessionConfig | None = None) -> str:
        """One line: a session's visual budget, caption history and worst-case KV, and where they come from."""
        config = config or SessionConfig()
        written = StreamDefaults.for_model(self.target.path)
        values = {"visual_token_budget": self.visual_token_budget(config), "caption_history": self.caption_history(config)}
        source = {name: "set" if (getattr(config, name) is not None and values[name] != getattr(self.defaults, name))
                  else STREAM_DEFAULTS_FILE if getattr(written, name) is not None
                  else f"derived from the context of {self.target.context_length} tokens" for name in values}
        tokens = self.kv_tokens_bound(config)
        kv = "unbounded" if tokens is None else f"<= {tokens} tokens = {tokens * self.target.kv_bytes_per_token / 2**20:.1f} MB"
        cap = "no cap" if config.max_kv_bytes is None else f"cap {config.max_kv_bytes / 2**20:g} MB"
        return (f"stream defaults: visual_token_budget {values['visual_token_budget']} ({source['visual_token_budget']}), "
                f"caption_history {values['caption_history']} ({source['caption_history']}); KV per stream {kv} ({cap})")

    def kv_tokens_bound(self, config: SessionConfig) -> int | None:
        """The most KV slots a session with this config can ever hold; None when that is unbounded (no visual
        budget, or every caption turn kept): the visual budget + `_slots_beside_frames`."""
        budget, history = self.visual_token_budget(config), self.caption_history(config)
        if budget is None or history is None:
            return None
        tree = self.decoders[self.resolve_decoding(config.decoding)].max_tree_tokens
        return budget + self._slots_beside_frames(config.instruction, history, self.max_caption_tokens(config), tree)

    def check_kv(self, config: SessionConfig) -> None:
        """ValueError when the worst-case KV of a session with this config is over config.max_kv_bytes."""
        if config.max_kv_bytes is None:
            return
        per_token = self.target.kv_bytes_per_token
        tokens = self.kv_tokens_bound(config)
        limit_mb = config.max_kv_bytes / 2**20
        if tokens is None:
            raise ValueError(
                f"the stream's KV would be unbounded (visual_token_budget {self.visual_token_budget(config)}, "
                f"caption_history {self.caption_history(config)}); the limit is {limit_mb:g} MB of KV per stream"
            )
        if tokens * per_token > config.max_kv_bytes:
            budget = self.visual_token_budget(config)
            fits = config.max_kv_bytes // per_token - (tokens - budget)
            raise ValueError(
                f"the stream's KV could reach {tokens} tokens = {tokens * per_token / 2**20:.1f} MB "
                f"({per_token} bytes per token; visual_token_budget {budget}, "
                f"caption_history {self.caption_history(config)}, max_caption_tokens {self.max_caption_tokens(config)}), "
                f"over the limit of {limit_mb:g} MB of KV per stream"
                + (f"; a visual_token_budget of at most {fits} fits" if fits > 0 else "")
            )

    def open_session(self, config: SessionConfig | None = None) -> CaptionSession:
        return CaptionSession(self, config or SessionConfig())


class CaptionSteps:
    """One caption of a session as a `ragged.Step` (`CaptionSession.open_caption`): the first step is the
    turn's opening (its prefix's forward: the caption's first token is decided there), each later one a step
    of the session's decoder; the last closes the turn (`CaptionTurn.close`) and counts the caption's
    decoding in the session's metrics. A drafting decoder drafts each step's tree as soon as it can
    (`draft_ahead`), or leaves it to `draft_captions` over many streams' captions at once. The turn's close
    is a forward of its own, after the caption is final: run at once, or with `close_later` left in
    `closing` for the caller to run (with other streams' work) before anything else goes into the stream."""

    def __init__(self, session: CaptionSession, end_s: float, max_tokens: int, draft_ahead: bool = True,
                 close_later: bool = False) -> None:
        self.session = session
        self.start_s, self.end_s = session._span(end_s)
        self.turn = CaptionTurn(session.stream, session.layout, session.history, prefill=False)
        self.max_tokens, self.draft_ahead, self.close_later = max_tokens, draft_ahead, close_later
        self.closing: StreamForward | None = None  # the turn's close, to run (`close_later`)
        self.tokens: list[int] = []
        self.metrics = DecodeMetrics()
        self.decode: DecodeSteps | None = None  # started by the opening's forward

    @property
    def done(self) -> bool:
        return self.decode is not None and self.decode.done

    def prepare(self) -> StreamForward:
        return self.turn.opening if self.decode is None else self.decode.prepare()

    def finish(self, forward: StreamForward) -> CaptionProgress:
        session = self.session
        if self.decode is None:  # the opening: decoding starts from the logits after the prefix
            self.decode = session.decoder.start(session.stream, forward.logits[-1], self.max_tokens, session.layout.stop_ids,
                                                session.sampling, session.generator, self.metrics, self.draft_ahead)
        else:
            self.tokens += self.decode.finish(forward).tokens
        if self.decode.done:
            if self.close_later:
                self.closing = self.turn.close_forward(self.tokens)
            else:
                self.turn.close(self.tokens)
            session.caption_start_s = self.end_s
            session.metrics.merge(self.metrics)
        return self.progress()

    def progress(self) -> CaptionProgress:
        """Where the caption stands: its text is every token the target has decided, the one the next step
        emits included (`next_token`: from the opening's forward on, the caption's first token is known before
        any step runs); the draft tail is the drafter's continuation below it."""
        session, stop_ids = self.session, self.session.layout.stop_ids
        decode = self.decode
        decided = [*self.tokens, *([] if decode is None or decode.done else [decode.next_token])]
        tail = [] if decode is None else decode.draft_tail()[1:]  # below the next token (the tail's root)
        tok = session.engine.target.tokenizer
        return CaptionProgress(
            text=tok.decode([t for t in decided if t not in stop_ids], skip_special_tokens=True).strip(),
            draft_tail=tok.decode(tail, skip_special_tokens=True) if tail else "",
            done=self.done,
            start_s=self.start_s,
            end_s=self.end_s,
            tokens=len(self.tokens),
            tau=self.metrics.tau,
        )


def draft_captions(captions: Sequence[CaptionSteps]) -> None:
    """Draft the next tree of every caption that needs one, all streams' at once (`speculative.draft_together`:
    one drafter forward per depth for every stream drafting)."""
    draft_together([caption.decode for caption in captions])


class CaptionSession:
    def __init__(self, engine: CaptionEngine, config: SessionConfig) -> None:
        if config.max_caption_tokens is not None and config.max_caption_tokens < 1:
            raise ValueError("max_caption_tokens must be >= 1")
        self.max_caption_tokens = engine.max_caption_tokens(config)
        self.engine = engine
        self.config = config
        self.decoding = engine.resolve_decoding(config.decoding)
        self.decoder: Decoder = engine.decoders[self.decoding]
        engine.check_kv(config)
        self.sampling = SamplingConfig(config.temperature, config.top_p)
        # on the model's device: every draw is from probabilities there (sampling.py); seeded, so a session's
        # sampled captions repeat on the same device
        self.generator = torch.Generator(engine.target.device).manual_seed(config.seed)
        target = engine.target
        max_slots = None if config.max_kv_bytes is None else config.max_kv_bytes // target.kv_bytes_per_token
        stream_config = StreamConfig(visual_token_budget=engine.visual_token_budget(config), max_slots=max_slots)
        # a decoder may need more kept per stream than the default (msd: the frames' raw embeddings)
        self.stream = TargetStream(target, stream_config.with_needs(self.decoder.needs))
        self.history = CaptionHistory(engine.caption_history(config))
        self.layout = target.caption_layout(config.instruction)  # the checkpoint's chat template's layout
        self.stream.append_text(self.layout.preamble)
        self.caption_start_s = 0.0
        self.metrics = DecodeMetrics()  # every caption's decoding so far
        self.catch_up()

    @property
    def media_time_s(self) -> float:
        return self.stream.media_time_s

    def ingest(self, frames: np.ndarray, timestamps: Sequence[float]) -> int:
        """Prefill uint8 RGB frames [N, H, W, 3] at media `timestamps`; returns the frames ingested."""
        ts = [float(t) for t in timestamps]
        self.stream.append_frames(frames, ts)
        self.catch_up()
        return len(ts)

    def catch_up(self) -> None:
        """Let the decoder take in what the stream gained since it last looked (a drafter's KV: the prompt,
        a closed caption turn, frames' text, msd's frame slots), so that a caption's first draft finds it
        level with the stream and ingests only that caption's own prefix. The session calls it after every
        append it makes outside a caption; a caption's closing turn (end token, suffix, a re-laid opening) is
        taken in at the next ingest, or sooner by a caller with time to spare: the service's worker calls it
        once a caption's final is posted, off that caption's latency."""
        self.decoder.prefill(self.stream)

    def _span(self, end_s: float) -> tuple[float, float]:
        """The media span of the next caption: from the previous caption's end to `end_s`, which the caller's
        `timeline.Timeline` gives (the segment span rule lives there); ValueError when it would leave out a
        frame already ingested."""
        if not end_s >= self.stream.media_time_s:
            raise ValueError(f"a caption span ending at {end_s:.3f}s leaves out the frame ingested at "
                             f"{self.stream.media_time_s:.3f}s; the span ends at or after the last frame")
        return self.caption_start_s, end_s

    def caption_steps(self, end_s: float, max_tokens: int | None = None) -> Iterator[CaptionProgress]:
        """Caption the media since the previous caption, a span ending at `end_s` (`_span`); one yield per
        target forward. Opens the caption at the first `next` (`open_caption`), then runs its steps alone."""
        yield from run_steps(self.open_caption(end_s, max_tokens))

    def ingest_forward(self, frames: np.ndarray, timestamps: Sequence[float]) -> StreamForward:
        """`ingest` as a forward to run (a scheduler may run many streams' forwards as one)."""
        return self.stream.frames_forward(frames, [float(t) for t in timestamps])

    def open_caption(self, end_s: float, max_tokens: int | None = None, draft_ahead: bool = True,
                     close_later: bool = False) -> CaptionSteps:
        """The caption of the media since the previous caption, a span ending at `end_s` (`_span`), as
        steps of one target forward each (`ragged.Step`); its turn is opened now (the prefix's forward).
        `draft_ahead`, `close_later`: see `CaptionSteps`."""
        return CaptionSteps(self, end_s, max_tokens or self.max_caption_tokens, draft_ahead, close_later)

    def append_caption(self, text: str, end_s: float) -> None:
        """Put a caption decided elsewhere (an earlier run, a reference) into the stream as a finished turn
        covering the media since the previous caption, up to `end_s` (`_span`)."""
        _, end = self._span(end_s)
        tokens = self.engine.target.encode_text(text)
        if len(tokens) > self.max_caption_tokens:  # the KV bound counts each turn at most this long
            raise ValueError(f"a caption of {len(tokens)} tokens is over the stream's max_caption_tokens of "
                             f"{self.max_caption_tokens}")
        self.history.append_turn(self.stream, self.layout.caption_turn(tokens))
        self.caption_start_s = end
        self.catch_up()

    def caption(self, end_s: float, max_tokens: int | None = None) -> CaptionProgress:
        """Run `caption_steps` to the end and return the final result."""
        progress = None
        for progress in self.caption_steps(end_s, max_tokens):  # noqa: B007 - the last one is the result
            pass
        return progress

    def stats(self) -> StreamStats:
        """The stream's numbers (KV, frames, evictions, media time); decoding's are `self.metrics`."""
        return self.stream.stats()

    def close(self) -> None:
        self.stream.close()
