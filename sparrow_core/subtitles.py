"""Caption cues as WebVTT, SRT or JSONL: one place for the offline CLI and the streaming clients.

    write_subtitles("captions.vtt", [Cue(0.0, 2.0, "a red ball rolls left")])   # format by extension
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

FORMATS = ("vtt", "srt", "jsonl")


@dataclass
class Cue:
    start_s: float
    end_s: float
    text: str
    segment_id: int | None = None


def format_timestamp(seconds: float, decimal: str = ".") -> str:
    """HH:MM:SS.mmm (WebVTT) or HH:MM:SS,mmm (SRT, decimal=",")."""
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def _span(cue: Cue) -> tuple[float, float]:
    start = max(0.0, cue.start_s)
    return start, max(start, cue.end_s)


def _clean(text: str) -> str:
    # A blank line ends a cue in both formats, and "-->" would read as a timing line.
    lines = [ln.strip() for ln in text.replace("-->", "->").splitlines()]
    return "\n".join(ln for ln in lines if ln)


def to_vtt(cues: Iterable[Cue]) -> str:
    out = ["WEBVTT", ""]
    for cue in cues:
        start, end = _span(cue)
        out += [f"{format_timestamp(start)} --> {format_timestamp(end)}", _clean(cue.text), ""]
    return "\n".join(out)


def to_srt(cues: Iterable[Cue]) -> str:
    out = []
    for i, cue in enumerate(cues, start=1):
        start, end = _span(cue)
        out += [str(i), f"{format_timestamp(start, ',')} --> {format_timestamp(end, ',')}", _clean(cue.text), ""]
    return "\n".join(out)


def to_jsonl(cues: Iterable[Cue]) -> str:
    return "".join(json.dumps({k: v for k, v in asdict(c).items() if v is not None}) + "\n" for c in cues)


def format_for(path: str | Path) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise ValueError(f"cannot tell the subtitle format of {path}: use one of .{', .'.join(FORMATS)}")
    return ext


def render(cues: Iterable[Cue], fmt: str) -> str:
    writers = {"vtt": to_vtt, "srt": to_srt, "jsonl": to_jsonl}
    if fmt not in writers:
        raise ValueError(f"unknown subtitle format {fmt!r}; use one of {', '.join(FORMATS)}")
    return writers[fmt](list(cues))


def write_subtitles(path: str | Path, cues: Iterable[Cue], fmt: str | None = None) -> Path:
    """Write cues to path in fmt (default: from the extension); return the path."""
    path = Path(path)
    text = render(cues, fmt or format_for(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
