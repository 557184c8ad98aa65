"""Captioning sessions: the model-side API that the service, the offline CLI and the benchmarks drive.

`CaptionEngine` is loaded once per process and owns the target (and the drafter, when one is loaded).
A `CaptionSession` is one stream: `ingest` prefills frames as they arrive, `caption_steps` decodes the
caption of the media since the previous caption, one target forward per yield, so a scheduler can
interleave many sessions on one model. Sessions are not thread-safe: one worker drives them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparrow_core.decoding.ar import DecodeStep, decode_ar
from sparrow_core.decoding.sampling import SamplingConfig
from sparrow_core.engine.caption_history import CaptionHistory
from sparrow_core.engine.checkpoint import load_target
from sparrow_core.engine.layout import (
    CAPTION_END,
    CAPTION_PREFIX,
    CAPTION_SUFFIX,
    caption_text,
    preamble_text,
)
from sparrow_core.engine.stream import StreamConfig, TargetStream
from sparrow_core.engine.target import TargetModel

STREAM_DEFAULTS_FILE = "sparrow_stream.json"


@dataclass(frozen=True)
class StreamDefaults:
    """How a checkpoint wants to be fed (written next to the default model by its trainer)."""

    sampling_fps: float = 0.0  # 0 = every frame
    caption_every_s: float = 4.0
    visual_token_budget: int | None = None
    caption_history: int | None = None  # earlier caption turns kept in the KV (see caption_history.py)
    max_caption_tokens: int = 48

    @classmethod
    def for_model(cls, model_dir: Path | None) -> StreamDefaults:
        path = Path(model_dir) / STREAM_DEFAULTS_FILE if model_dir is not None else None
        if path is None or not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))


# A decoder: (stream, next-token logits, max tokens, stop ids, sampling, generator) -> steps.
Decoder = Callable[..., Iterator[DecodeStep]]


@dataclass
class SessionConfig:
    instruction: str | None = None  # None -> the model's default instruction
    max_caption_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    decoding: str = "auto"  # a name in CaptionEngine.decoders, or "auto" (sparrow when a drafter is loaded)
    visual_token_budget: int | None = None  # None: the model's default (engine.defaults); 0: no budget
    caption_history: int | None = None  # earlier caption turns kept; None: the model's default; 0: all
    sample_fps: float | None = None  # keep at most this many frames per media second; None = all
    seed: int = 0


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
    forwards: int  # target forwards so far
    tau: float | None  # mean tokens per target forward (bonus token included)


@dataclass
class SessionStats:
    kv_tokens: int
    visual_tokens: int
    visual_tokens_evicted: int
    frames_ingested: int
    frames_skipped: int
    media_time_s: float
    tokens_generated: int
    target_forwards: int
    kv_bytes: int

    @property
    def tau(self) -> float | None:
        return self.tokens_generated / self.target_forwards if self.target_forwards else None


class CaptionEngine:
    def __init__(self, target: TargetModel, drafter=None) -> None:
        self.target = target
        self.drafter = drafter
        self.decoders: dict[str, Decoder] = {"ar": decode_ar}
        self.defaults = StreamDefaults.for_model(target.path)
        if drafter is not None:
            self.decoders.update(drafter.decoders())

    @classmethod
    def load(
        cls, model_dir: str | Path | None = None, drafter_dir: str | Path | None = None, device: str = "cpu"
    ) -> CaptionEngine:
        """`model_dir=None` loads the embedded default model (and its drafter, if shipped)."""
        target = load_target(model_dir, device=device)
        if drafter_dir is None and target.path is not None and (target.path / "drafter").is_dir():
            drafter_dir = target.path / "drafter"
        drafter = None
        if drafter_dir is not None:
            from sparrow_core.decoding.drafter import load_drafter

            drafter = load_drafter(drafter_dir, target)
        return cls(target, drafter)

    @property
    def info(self) -> EngineInfo:
        t = self.target
        size = getattr(t, "image_size", None)
        return EngineInfo(
            model_name=t.name(),
            architecture=t.architecture,
            num_layers=t.num_layers,
            hidden_size=t.hidden_size,
            frame_size=(size, size) if size else None,
            tokens_per_frame=getattr(t, "tokens_per_frame", None),
            has_drafter=self.drafter is not None,
            decoding_methods=sorted(self.decoders),
        )

    def resolve_decoding(self, name: str) -> str:
        if name == "auto":
            return "sparrow" if "sparrow" in self.decoders else "ar"
        if name not in self.decoders:
            raise ValueError(f"decoding method {name!r} is not available; available: {', '.join(sorted(self.decoders))}")
        return name

    def open_session(self, config: SessionConfig | None = None) -> CaptionSession:
        return CaptionSession(self, config or SessionConfig())


class CaptionSession:
    def __init__(self, engine: CaptionEngine, config: SessionConfig) -> None:
        if config.max_caption_tokens < 1:
            raise ValueError("max_caption_tokens must be >= 1")
        if config.sample_fps is not None and config.sample_fps <= 0:
            raise ValueError("sample_fps must be > 0")
        self.engine = engine
        self.config = config
        self.decoding = engine.resolve_decoding(config.decoding)
        self.sampling = SamplingConfig(config.temperature, config.top_p)
        self.generator = torch.Generator().manual_seed(config.seed)
        target = engine.target
        # a decoder may need more kept per stream than the default (msd: the frames' raw embeddings)
        options = getattr(engine.decoders[self.decoding], "stream_options", {})
        budget = engine.defaults.visual_token_budget if config.visual_token_budget is None else config.visual_token_budget
        self.stream: TargetStream = target.open_stream(StreamConfig(visual_token_budget=budget or None, **options))
        keep = engine.defaults.caption_history if config.caption_history is None else config.caption_history
        self.history = CaptionHistory(keep or None)
        self.stop_ids = target.stop_token_ids()
        self._caption_prefix = target.encode_text(CAPTION_PREFIX)
        self._caption_suffix = target.encode_text(CAPTION_SUFFIX)
        self._end_id = target.tokenizer.convert_tokens_to_ids(CAPTION_END)
        self.stream.append_text(target.encode_text(preamble_text(config.instruction)))
        self.caption_start_s = 0.0
        self._last_kept_t: float | None = None
        self.frames_skipped = 0
        self.tokens_generated = 0
        self.target_forwards = 0

    @property
    def media_time_s(self) -> float:
        return self.stream.media_time_s

    def ingest(self, frames: np.ndarray, timestamps: Sequence[float]) -> int:
        """Prefill uint8 RGB frames [N, H, W, 3] at media `timestamps`; returns frames kept after fps sampling."""
        ts = [float(t) for t in timestamps]
        if self.config.sample_fps is not None and len(ts) == len(frames):
            period = 1.0 / self.config.sample_fps
            keep = []
            for i, t in enumerate(ts):
                if self._last_kept_t is None or t - self._last_kept_t >= period - 1e-9:
                    keep.append(i)
                    self._last_kept_t = t
            self.frames_skipped += len(ts) - len(keep)
            if not keep:
                return 0
            frames, ts = frames[keep], [ts[i] for i in keep]
        self.stream.append_frames(frames, ts)
        return len(ts)

    def caption_steps(self, max_tokens: int | None = None) -> Iterator[CaptionProgress]:
        """Caption the media since the previous caption; one yield per target forward."""
        max_tokens = max_tokens or self.config.max_caption_tokens
        start, end = self.caption_start_s, self.stream.media_time_s
        self.history.begin_turn(self.stream)
        logits = self.stream.append_text(self._caption_prefix)
        tokens: list[int] = []
        forwards = 0
        decoder = self.engine.decoders[self.decoding]
        tok = self.engine.target.tokenizer
        for step in decoder(self.stream, logits, max_tokens, self.stop_ids, self.sampling, self.generator):
            tokens += step.tokens
            forwards += 1
            text_tokens = [t for t in tokens if t not in self.stop_ids]
            done = step.done
            if done and (not tokens or tokens[-1] not in self.stop_ids):
                self.stream.append_text([self._end_id])  # a caption cut at max tokens still ends its turn
            if done:
                self.stream.append_text(self._caption_suffix)
                self.history.end_turn(self.stream)
                self.caption_start_s = end
                self.tokens_generated += len(tokens)
                self.target_forwards += forwards
            yield CaptionProgress(
                text=tok.decode(text_tokens, skip_special_tokens=True).strip(),
                draft_tail=tok.decode(step.draft_tail, skip_special_tokens=True) if step.draft_tail else "",
                done=done,
                start_s=start,
                end_s=end,
                tokens=len(tokens),
                forwards=forwards,
                tau=len(tokens) / forwards,
            )

    def append_caption(self, text: str) -> None:
        """Put a caption decided elsewhere (an earlier run, a reference) into the stream as a finished turn
        covering the media since the previous caption."""
        self.history.append_turn(self.stream, self.engine.target.encode_text(caption_text(text)))
        self.caption_start_s = self.stream.media_time_s

    def caption(self, max_tokens: int | None = None) -> CaptionProgress:
        """Run `caption_steps` to the end and return the final result."""
        progress = None
        for progress in self.caption_steps(max_tokens):  # noqa: B007 - the last one is the result
            pass
        return progress

    def stats(self) -> SessionStats:
        st = self.stream.stats()
        return SessionStats(
            kv_tokens=st.slots,
            visual_tokens=st.frame_slots,
            visual_tokens_evicted=st.frame_slots_evicted,
            frames_ingested=st.frames_ingested,
            frames_skipped=self.frames_skipped,
            media_time_s=st.media_time_s,
            tokens_generated=self.tokens_generated,
            target_forwards=self.target_forwards,
            kv_bytes=st.kv_bytes,
        )

    def close(self) -> None:
        self.stream.close()
