"""Synthetic demo/test corpus: real encoded videos (PyAV) with WBDC-style annotations and a two-level taxonomy.

Why synthetic: the demo and the test suite must run offline on a laptop, yet exercise the real decode path
(H.264/AAC in mp4, a few mkv and webm; with ``codecs="wide"`` also hevc 8/10-bit, vp9, mpeg4, prores in mov;
variable frame rate, no-audio tracks, corrupt files) and give the downstream models a label signal that is
*learnable by random-init small encoders* and that *needs fusion*.

Evidence scheme (the reason for every choice below)
----------------------------------------------------
Each video has a level-2 class ``LLSS`` (level-1 code ``LL``, index ``SS`` of the level-2 class within it).

* **Frames carry level-1 only.** Every level-1 class owns a background hue (``index / num_level1`` of the
  colour wheel, jittered by at most a fifth of the gap between classes), a texture (flat, horizontal,
  vertical or diagonal stripes in brightness) and a moving neutral-coloured shape (circle, square, triangle,
  ring, cross, diamond). Brightness, saturation, shape size, speed and per-pixel noise vary per video.
  The mean frame colour alone recovers level-1; a tiny CNN sees colour and shape easily.
* **Audio carries the level-2 index only**, shared across level-1 classes: a tone whose frequency is one of
  ``num_level2_per_level1`` log-spaced values between 300 Hz and 4 kHz (at least a factor 1.3 apart), gated
  by a rhythm of ``1 + index/2`` pulses per second, plus a random low hum (60-120 Hz) and white noise. The
  dominant FFT peak above 150 Hz recovers the index. Some videos have no audio track and some a silent one.
* **Text carries the level-2 index only**: each index owns a "setting" (beach, mountain, city, ...) with
  keywords that appear in the title, ASR and OCR, mixed with neutral filler words. The same keywords are used
  under every level-1 class, and no level-1 name ever appears in the text, so text alone cannot reveal
  level-1. Level-2 names are "<setting> <level-1 name>" (e.g. "beach sports"), so zero-shot labelling against
  ``class_names.txt`` has something to match.
* **Independent corruption**: each modality, independently with probability ``noise_rate``, shows the evidence
  of a *different* random class (frames: another level-1; audio and text: another index). A single modality
  therefore tops out at 1/num_level2_per_level1 (frames) or 1/num_level1 (audio, text) level-2 accuracy,
  while fusing frames with audio or text recovers the level-2 class.

Evidence layouts (``corpus.layout``, :data:`LAYOUTS`) vary that scheme, so that a model's defaults are judged
on more than one corpus (``raypipe bench generalization``): ``split`` is the scheme above; ``text_rich`` also
names the level-1 class in the text (text alone can be right; fusion must not lose to it); ``weak_text`` makes
the text wrong half the time (the audio must back it up); ``no_audio`` drops the audio track of most videos and
makes the text noisier. Layout draws use their own random stream, so ``split`` corpora are byte-identical to
those generated before layouts existed.

The generator records the evidence each video really shows (``frame_l1``, ``audio_index``, ``text_index`` in
``corpus.json``) so tests can check that the files carry it.

Determinism: every video draws from its own ``numpy`` generator seeded by ``(seed, id_prefix, index)``;
x264 and libvpx run single-threaded (libvpx in "good" mode: "realtime" adapts to wall-clock time) and the
muxers in bitexact mode, so one seed gives byte-identical files, whatever ``workers`` is.

Layout under ``cfg.out``: ``videos/`` (all files, good and bad), ``annotations.json`` (WBDC list),
``taxonomy.json``, ``class_names.txt`` and ``corpus.json`` (the :class:`CorpusInfo`, paths relative to the
root). Generating again with another ``id_prefix`` into the same folder merges the JSON files; generating with
the same prefix replaces that batch.
"""

# Long module: one generator whose evidence scheme (the docstring) ties every part together -- taxonomy,
# per-video plan, frame/audio/text synthesis, encoding, annotations; split only where a part stands alone.

from __future__ import annotations

import colorsys
import json
import logging
import math
import os
import time
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raypipe.config import CorpusConfig

if TYPE_CHECKING:
    from raypipe.config import RaypipeConfig

log = logging.getLogger(__name__)

CORPUS_FORMAT = 1
LONG_THRESHOLD_S = 32.0
LONG_CAP_S = 75.0
FPS_CHOICES = (15, 24, 25, 30)
RESOLUTIONS = ((160, 120), (176, 144), (240, 180), (320, 180), (320, 240), (426, 240), (480, 270), (640, 360))
# ``corpus.resolutions: hd``: what phones and uploads carry (720p listed twice: drawn twice as often); decoding
# dominates embedding at these sizes (benchmarks).
HD_RESOLUTIONS = ((854, 480), (960, 540), (1280, 720), (1280, 720), (1920, 1080))
GOP_CHOICES = (12, 30, 50, 100, 250)
AAC_RATES = (16000, 22050, 44100)
# ``corpus.codecs: wide``: (container, video codec, audio codec), one drawn per video; what uploads also carry
# besides h264: hevc 8 and 10 bit, vp9, mpeg4 part 2, prores in mov; mp3, flac and pcm audio.
WIDE_CODECS = (
    ("mp4", "h264", "aac"),
    ("mp4", "hevc", "aac"),
    ("mkv", "hevc10", "flac"),
    ("webm", "vp9", "opus"),
    ("mkv", "mpeg4", "mp3"),
    ("mov", "prores", "pcm_s16le"),
)
TONE_MIN_HZ, TONE_MAX_HZ = 300.0, 4000.0
SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
TEXTURES = ("flat", "hstripes", "vstripes", "diagonal")

LEVEL1_NAMES = (
    "sports", "music", "cooking", "travel", "animals", "gaming", "science", "fashion", "cars", "comedy",
    "dance", "painting", "fitness", "news", "education", "technology", "crafts", "movies", "health",
    "business", "history", "photography", "architecture",
)  # fmt: skip

# level-2 index -> (setting, keywords). Shared by every level-1 class: text reveals the index, not level-1.
SETTINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("beach", ("beach", "sand", "waves", "surf", "seashell")),
    ("mountain", ("mountain", "summit", "cliff", "alpine", "glacier")),
    ("city", ("city", "street", "traffic", "skyscraper", "downtown")),
    ("forest", ("forest", "trees", "moss", "woodland", "pinecone")),
    ("desert", ("desert", "dunes", "cactus", "camel", "canyon")),
    ("lake", ("lake", "canoe", "pier", "pond", "rowing")),
    ("snow", ("snow", "frost", "blizzard", "sled", "snowman")),
    ("night", ("night", "moonlight", "stars", "lantern", "midnight")),
    ("garden", ("garden", "flowers", "roses", "tulips", "greenhouse")),
    ("farm", ("farm", "barn", "tractor", "cows", "hay")),
)

FILLER = (
    "today", "video", "watch", "really", "great", "new", "look", "this", "part", "episode", "with", "friends",
    "best", "moments", "full", "clip", "check", "out", "my", "latest", "so", "much", "fun", "we", "went",
    "there", "again", "and", "the", "a", "of", "day", "time", "first", "try", "you", "will", "love", "it",
    "here", "is", "what", "happened", "next", "quick", "short", "long", "story", "amazing", "wow",
)  # fmt: skip

EMOJI_TEXT = {"title": "🎉🎉🎉!!! 😀😀 ...", "asr": "👍 👍 ?! 🔥🔥 … ♪♪", "ocr": ["😂😂😂", "!!! ???"]}

# Bad inputs: kind -> (file suffix, must the video decode?). Order is the order they are generated in.
BAD_KINDS: dict[str, tuple[str, bool]] = {
    "zero_byte": (".mp4", False),
    "truncated": (".mp4", False),
    "random_bytes": (".mp4", False),
    "no_video_stream": (".mp4", False),
    "audio_only": (".mp4", False),
    "tiny_clip": (".mp4", True),
    "missing_annotation": (".mp4", True),
    "emoji_text": (".mp4", True),
}


# --------------------------------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------------------------------


@dataclass
class VideoSpec:
    """One good video: what was encoded, its label and the evidence each modality really shows."""

    video_id: str
    path: Path
    container: str  # "mp4" | "mkv" | "webm" | "mov"
    duration_s: float
    fps: float | None  # None for variable frame rate
    vfr: bool
    width: int
    height: int
    has_audio: bool
    silent_audio: bool
    keyframe_interval: int
    label: str  # 4-digit level-2 code
    label_l1: str  # 2-digit level-1 code
    has_annotation: bool = True
    video_codec: str = "h264"
    audio_codec: str | None = "aac"
    sample_rate: int | None = None
    frame_l1: str = ""  # level-1 code the frames show (== label_l1 unless corrupted)
    audio_index: int | None = None  # level-2 index the audio tone shows (None: no or silent audio)
    text_index: int | None = None  # level-2 index the text keywords show
    text_l1: str | None = None  # level-1 code the text names (layout text_rich only)
    batch: str = ""  # the id_prefix this video was generated with


@dataclass
class BadSpec:
    """One deliberately awkward input; ``expect_ok`` says whether a decoder should still produce a row."""

    video_id: str
    path: Path
    kind: str
    expect_ok: bool
    label: str | None = None
    has_annotation: bool = True
    batch: str = ""


@dataclass
class CorpusInfo:
    """Where everything is; also persisted as ``root/corpus.json`` (paths relative to ``root``)."""

    root: Path
    videos_dir: Path
    annotations_path: Path
    taxonomy_path: Path
    class_names_path: Path
    videos: list[VideoSpec] = field(default_factory=list)
    bad: list[BadSpec] = field(default_factory=list)

    @property
    def corpus_path(self) -> Path:
        return self.root / "corpus.json"

    @classmethod
    def at(cls, root: str | Path) -> CorpusInfo:
        root = Path(root)
        return cls(
            root=root,
            videos_dir=root / "videos",
            annotations_path=root / "annotations.json",
            taxonomy_path=root / "taxonomy.json",
            class_names_path=root / "class_names.txt",
        )

    def taxonomy(self) -> dict[str, dict[str, str]]:
        return json.loads(self.taxonomy_path.read_text())

    def to_json(self) -> dict[str, Any]:
        def rel(spec: VideoSpec | BadSpec) -> dict[str, Any]:
            d = asdict(spec)
            d["path"] = spec.path.relative_to(self.root).as_posix()
            return d

        return {
            "format": CORPUS_FORMAT,
            "videos": [rel(v) for v in self.videos],
            "bad": [rel(b) for b in self.bad],
        }

    def save(self) -> None:
        _write_json_atomic(self.corpus_path, self.to_json())

    @classmethod
    def load(cls, root: str | Path) -> CorpusInfo:
        info = cls.at(root)
        if not info.corpus_path.is_file():
            raise FileNotFoundError(f"{info.corpus_path} not found: not a corpus made by `raypipe corpus`")
        data = json.loads(info.corpus_path.read_text())
        if data.get("format") != CORPUS_FORMAT:
            raise ValueError(f"{info.corpus_path}: unsupported corpus format {data.get('format')!r}")

        def build(kind: type[VideoSpec] | type[BadSpec], d: dict[str, Any]) -> Any:
            known = {f.name for f in fields(kind)}
            d = {k: v for k, v in d.items() if k in known}
            d["path"] = info.root / d["path"]
            return kind(**d)

        info.videos = [build(VideoSpec, d) for d in data["videos"]]
        info.bad = [build(BadSpec, d) for d in data["bad"]]
        return info


# --------------------------------------------------------------------------------------------------------------
# Taxonomy, text and evidence helpers
# --------------------------------------------------------------------------------------------------------------


def build_taxonomy(num_level1: int, num_level2_per_level1: int) -> dict[str, dict[str, str]]:
    """``{"level1": {"01": "sports"}, "level2": {"0101": "beach sports"}}``."""
    if not 1 <= num_level1 <= len(LEVEL1_NAMES):
        raise ValueError(f"corpus.num_level1 must be in [1, {len(LEVEL1_NAMES)}] (got {num_level1})")
    if not 1 <= num_level2_per_level1 <= len(SETTINGS):
        raise ValueError(f"corpus.num_level2_per_level1 must be in [1, {len(SETTINGS)}] (got {num_level2_per_level1})")
    level1 = {f"{a + 1:02d}": LEVEL1_NAMES[a] for a in range(num_level1)}
    level2 = {
        f"{a + 1:02d}{b + 1:02d}": f"{SETTINGS[b][0]} {LEVEL1_NAMES[a]}"
        for a in range(num_level1)
        for b in range(num_level2_per_level1)
    }
    return {"level1": level1, "level2": level2}


def tone_frequencies(num_level2_per_level1: int) -> list[float]:
    """Tone (Hz) per level-2 index: log-spaced so neighbours stay far apart on a mel scale too."""
    n = num_level2_per_level1
    if n == 1:
        return [1000.0]
    ratio = (TONE_MAX_HZ / TONE_MIN_HZ) ** (1.0 / (n - 1))
    return [round(TONE_MIN_HZ * ratio**k, 1) for k in range(n)]


def level1_hue(l1_index: int, num_level1: int) -> float:
    """Centre hue (0..1) of a level-1 class's background."""
    return l1_index / num_level1


def keyword_index(text: str, num_level2_per_level1: int) -> int | None:
    """The level-2 index whose setting keywords occur most often in ``text`` (None when none occurs)."""
    words = [w.strip(".,!?:;").lower() for w in text.split()]
    counts = [sum(w in SETTINGS[k][1] for w in words) for k in range(num_level2_per_level1)]
    best = int(np.argmax(counts))
    return best if counts[best] > 0 else None


@dataclass(frozen=True)
class Layout:
    """Which modality shows what, and how often it lies. ``None`` noise = ``corpus.noise_rate``."""

    frame_noise: float | None = None
    audio_noise: float | None = None
    text_noise: float | None = None
    text_l1_noise: float | None = None  # text also names the level-1 class (wrong at this rate) when not None
    audio_fraction: float | None = None  # share of videos with an audio track; None = the fixed index pattern


LAYOUTS: dict[str, Layout] = {
    "split": Layout(),
    "text_rich": Layout(text_l1_noise=0.15),
    "weak_text": Layout(text_noise=0.5, audio_noise=0.1),
    "no_audio": Layout(text_noise=0.3, audio_fraction=0.25),
}


def _layout_audio(cfg: CorpusConfig, index: int, has_audio: bool | None) -> bool | None:
    """The layout's share of videos with audio (an explicit ``has_audio`` wins); None = the default pattern."""
    fraction = LAYOUTS[cfg.layout].audio_fraction
    if has_audio is not None or fraction is None:
        return has_audio
    return bool(_video_rng(cfg.seed, cfg.id_prefix, index, salt=7).random() < fraction)


def _apply_layout(
    cfg: CorpusConfig, index: int, a: int, b: int, drawn: tuple[int, int, int]
) -> tuple[int, int, int, int | None]:
    """``(frame_l1, audio_idx, text_idx, text_l1)`` under ``cfg.layout``; ``split`` keeps the ``drawn`` evidence
    (the main stream's draws, so old corpora stay byte-identical), the others redraw from their own stream."""
    lay = LAYOUTS[cfg.layout]
    if cfg.layout == "split":
        return (*drawn, None)
    rng = _video_rng(cfg.seed, cfg.id_prefix, index, salt=9)
    n1, n2 = cfg.num_level1, cfg.num_level2_per_level1

    def noisy(true: int, n: int, rate: float | None) -> int:
        return _other(rng, n, true) if rng.random() < (cfg.noise_rate if rate is None else rate) else true

    frame_l1, audio_idx, text_idx = noisy(a, n1, lay.frame_noise), noisy(b, n2, lay.audio_noise), noisy(b, n2, lay.text_noise)
    text_l1 = noisy(a, n1, lay.text_l1_noise) if lay.text_l1_noise is not None else None
    return frame_l1, audio_idx, text_idx, text_l1


def _add_level1_words(text: dict[str, Any], l1: int, rng: np.random.Generator) -> dict[str, Any]:
    """Name the level-1 class (its name, e.g. "sports") in the title and once or twice in the ASR."""
    word = LEVEL1_NAMES[l1]
    title = text["title"].split(" ")
    title.insert(int(rng.integers(0, len(title) + 1)), word)
    asr = text["asr"].split(" ")
    for _ in range(int(rng.integers(1, 3))):
        asr.insert(int(rng.integers(0, len(asr) + 1)), word)
    return {**text, "title": " ".join(title), "asr": " ".join(asr)}


def _other(rng: np.random.Generator, n: int, true: int) -> int:
    """A uniformly random class index different from ``true`` (corruption must really mislead)."""
    k = int(rng.integers(0, n - 1))
    return k + 1 if k >= true else k


def _make_text(rng: np.random.Generator, index: int, duration_s: float) -> dict[str, Any]:
    """Title, ASR and OCR mixing the setting keywords of ``index`` with neutral filler."""
    keywords = SETTINGS[index][1]

    def filler(k: int) -> list[str]:
        return [str(w) for w in rng.choice(FILLER, size=k)]

    def kw() -> str:
        return str(rng.choice(keywords))

    title_words = filler(int(rng.integers(2, 5)))
    if rng.random() < 0.8:
        title_words.insert(int(rng.integers(0, len(title_words) + 1)), kw())
    title = " ".join(title_words).capitalize()
    if rng.random() < 0.5:
        title += str(rng.choice(["!", "?", " ...", " :)"]))

    asr_words = filler(int(rng.integers(6, 16)))
    for _ in range(int(rng.integers(1, 4))):
        asr_words.insert(int(rng.integers(0, len(asr_words) + 1)), kw())
    asr = " ".join(asr_words)

    ocr = []
    n_ocr = int(rng.integers(0, 4))
    times = np.sort(rng.uniform(0.0, max(duration_s - 0.1, 0.05), size=n_ocr))
    for t in times:
        words = filler(int(rng.integers(1, 3)))
        if rng.random() < 0.6:
            words.append(kw())
        ocr.append({"time": round(float(t), 2), "text": " ".join(words).upper()})
    return {"title": title, "asr": asr, "ocr": ocr}


# --------------------------------------------------------------------------------------------------------------
# Planning: every random choice is made here, so rendering is a pure function of the plan
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    spec: VideoSpec
    annotation: dict[str, Any] | None
    render_seed: int
    num_level1: int
    num_level2: int
    frame_times: list[float] | None = None  # VFR only: presentation time (s) of every frame


def _video_rng(seed: int, prefix: str, index: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(prefix.encode()), index, salt])


def _plan_durations(cfg: CorpusConfig, rng: np.random.Generator) -> list[float]:
    n = cfg.videos
    short_hi = cfg.short_max_duration_s or min(cfg.max_duration_s, LONG_THRESHOLD_S)
    short_lo = min(cfg.min_duration_s, short_hi)
    n_long = int(round(cfg.long_fraction * n)) if cfg.max_duration_s > LONG_THRESHOLD_S else 0
    long_hi = min(cfg.max_duration_s, LONG_CAP_S)
    long_lo = min(max(cfg.min_duration_s, LONG_THRESHOLD_S + 0.5), long_hi)
    long_set = set(rng.choice(n, size=min(n_long, n), replace=False).tolist()) if n_long else set()
    out = []
    for i in range(n):
        if i in long_set:
            out.append(float(rng.uniform(long_lo, long_hi)))
        else:  # log-uniform: many short clips, a few longer ones, as in real uploads
            out.append(float(math.exp(rng.uniform(math.log(short_lo), math.log(short_hi)))))
    return out


def plan_video(
    cfg: CorpusConfig,
    *,
    index: int,
    video_id: str,
    label_idx: int,
    duration_s: float,
    videos_dir: Path,
    container: str | None = None,
    vfr: bool | None = None,
    has_audio: bool | None = None,
    silent_audio: bool | None = None,
    fps: int | None = None,
    text_override: dict[str, Any] | None = None,
    has_annotation: bool = True,
) -> _Plan:
    rng = _video_rng(cfg.seed, cfg.id_prefix, index)
    n1, n2 = cfg.num_level1, cfg.num_level2_per_level1
    a, b = divmod(label_idx, n2)
    video_codec, audio_codec = "h264", "aac"
    if container is None and cfg.codecs == "wide":
        draw = _video_rng(cfg.seed, cfg.id_prefix, index, salt=9).integers(0, len(WIDE_CODECS))
        container, video_codec, audio_codec = WIDE_CODECS[int(draw)]
    elif container is None:
        container = "mkv" if index % 10 == 3 else "webm" if index % 10 == 7 else "mp4"
    if container == "webm" and video_codec == "h264":  # webm holds vp8/vp9 and opus only
        video_codec, audio_codec = "vp8", "opus"
    if vfr is None:
        vfr = index == 1
    has_audio = _layout_audio(cfg, index, has_audio)
    if has_audio is None:
        has_audio = index % 8 != 5
    if silent_audio is None:
        silent_audio = has_audio and index % 16 == 10
    drawn_fps = int(rng.choice(FPS_CHOICES))
    fps = fps or drawn_fps
    sizes = HD_RESOLUTIONS if cfg.resolutions == "hd" else RESOLUTIONS
    width, height = (int(x) for x in sizes[int(rng.integers(0, len(sizes)))])
    gop = int(rng.choice(GOP_CHOICES))
    sample_rate = 48000 if audio_codec == "opus" else int(rng.choice(AAC_RATES))

    frame_l1 = _other(rng, n1, a) if rng.random() < cfg.noise_rate else a
    audio_idx = _other(rng, n2, b) if rng.random() < cfg.noise_rate else b
    text_idx = _other(rng, n2, b) if rng.random() < cfg.noise_rate else b
    frame_l1, audio_idx, text_idx, text_l1 = _apply_layout(cfg, index, a, b, (frame_l1, audio_idx, text_idx))

    frame_times: list[float] | None = None
    if vfr:
        # Frame intervals jump between 30, 24, 15 and 10 fps, in runs, like a phone under changing light.
        times, t = [], 0.0
        while t < duration_s - 1e-9 or not times:
            times.append(round(t, 3))
            t += float(rng.choice([1 / 30, 1 / 24, 1 / 15, 1 / 10]))
        frame_times = times
        step = times[-1] - times[-2] if len(times) > 1 else 0.1
        actual = round(times[-1] + step, 3)
    else:
        n_frames = max(1, round(duration_s * fps))
        actual = n_frames / fps

    text = text_override if text_override is not None else _make_text(rng, text_idx, actual)
    if text_l1 is not None and text_override is None:
        text = _add_level1_words(text, text_l1, _video_rng(cfg.seed, cfg.id_prefix, index, salt=8))
    label = f"{a + 1:02d}{b + 1:02d}"
    spec = VideoSpec(
        video_id=video_id,
        path=videos_dir / f"{video_id}.{container}",
        container=container,
        duration_s=round(actual, 4),
        fps=None if vfr else float(fps),
        vfr=vfr,
        width=width,
        height=height,
        has_audio=has_audio,
        silent_audio=bool(silent_audio),
        keyframe_interval=gop,
        label=label,
        label_l1=label[:2],
        has_annotation=has_annotation,
        video_codec=video_codec,
        audio_codec=audio_codec if has_audio else None,
        sample_rate=sample_rate if has_audio else None,
        frame_l1=f"{frame_l1 + 1:02d}",
        audio_index=audio_idx if has_audio and not silent_audio else None,
        text_index=text_idx if text_override is None else None,
        text_l1=f"{text_l1 + 1:02d}" if text_l1 is not None and text_override is None else None,
        batch=cfg.id_prefix,
    )
    annotation = {"id": video_id, **text, "category_id": label} if has_annotation else None
    return _Plan(
        spec=spec,
        annotation=annotation,
        render_seed=int(rng.integers(0, 2**31 - 1)),
        num_level1=n1,
        num_level2=n2,
        frame_times=frame_times,
    )


# --------------------------------------------------------------------------------------------------------------
# Rendering: numpy frames and audio, encoded with PyAV
# --------------------------------------------------------------------------------------------------------------


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean sprite ``(size, size)`` of one of :data:`SHAPES`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    dx, dy = (xx - c) / (size / 2.0), (yy - c) / (size / 2.0)
    r = np.sqrt(dx**2 + dy**2)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    if shape == "triangle":
        return (dy >= -0.9) & (dy <= 0.9) & (np.abs(dx) <= (dy + 0.9) / 1.8)
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "cross":
        return ((np.abs(dx) <= 0.3) | (np.abs(dy) <= 0.3)) & (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.0
    raise ValueError(f"unknown shape {shape!r}")


class _FrameRenderer:
    """Per-video scene: a textured background in the level-1 hue with a moving shape; a few frames of noise."""

    def __init__(self, rng: np.random.Generator, *, l1_index: int, num_level1: int, width: int, height: int):
        gap = 1.0 / num_level1
        hue = (level1_hue(l1_index, num_level1) + rng.uniform(-0.2, 0.2) * gap) % 1.0
        sat, val = rng.uniform(0.6, 0.95), rng.uniform(0.55, 0.9)
        base = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0  # (3,)

        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        texture = TEXTURES[l1_index % len(TEXTURES)]
        period = float(rng.uniform(10, 24))
        if texture == "hstripes":
            pattern = np.sin(2 * np.pi * yy / period)
        elif texture == "vstripes":
            pattern = np.sin(2 * np.pi * xx / period)
        elif texture == "diagonal":
            pattern = np.sin(2 * np.pi * (xx + yy) / period)
        else:
            pattern = np.zeros_like(xx)
        gradient = (yy / max(height - 1, 1) - 0.5) * 0.15
        scale = 1.0 + 0.12 * pattern + gradient  # (H, W): brightness only, so the hue is untouched
        bg = base[None, None, :] * scale[:, :, None]  # (H, W, 3)
        # Per-pixel noise baked into the background, which then pans slowly: noise and motion for the cost of
        # one roll per frame, and cheap for the encoder (fresh noise every frame would cost ~10x the bits).
        self.background = np.clip(bg + rng.normal(0.0, 10.0, size=bg.shape), 0, 255).astype(np.uint8)  # (H, W, 3)
        self.pan = rng.uniform(-0.1, 0.1) * width  # pixels per second

        size = max(8, int(min(width, height) * rng.uniform(0.25, 0.4)))
        self.sprite = _shape_mask(SHAPES[l1_index % len(SHAPES)], size)  # (S, S)
        dark = (l1_index // len(SHAPES)) % 2 == 1
        self.colour = np.array([30, 30, 30] if dark else [240, 240, 240], dtype=np.uint8)
        self.size, self.width, self.height = size, width, height
        self.pos = np.array([rng.uniform(0, width - size), rng.uniform(0, height - size)])
        speed = rng.uniform(0.15, 0.5) * min(width, height)  # pixels per second
        angle = rng.uniform(0, 2 * np.pi)
        self.vel = np.array([math.cos(angle), math.sin(angle)]) * speed

    def frame(self, t: float) -> np.ndarray:
        """RGB frame ``(H, W, 3)`` uint8 at time ``t`` (bouncing motion is a closed form of ``t``)."""
        img = np.roll(self.background, int(self.pan * t), axis=1)  # a copy
        span = np.array([self.width - self.size, self.height - self.size], dtype=np.float64)
        raw = self.pos + self.vel * t
        pos = np.where(span > 0, span - np.abs(np.mod(raw, 2 * np.maximum(span, 1e-9)) - span), 0.0)
        x, y = int(pos[0]), int(pos[1])
        img[y : y + self.size, x : x + self.size][self.sprite] = self.colour
        return img


def _audio_signal(
    rng: np.random.Generator, *, index: int | None, num_level2: int, sample_rate: int, duration_s: float
) -> np.ndarray:
    """Mono float32 ``(N,)``: tone + rhythm for ``index``, hum and noise; zeros when ``index`` is None."""
    n = int(round(duration_s * sample_rate))
    if index is None:
        return np.zeros(n, dtype=np.float32)
    t = np.arange(n, dtype=np.float64) / sample_rate
    freq = tone_frequencies(num_level2)[index]
    rate = 1.0 + index / 2.0
    envelope = 0.65 + 0.35 * np.sign(np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    tone = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)) * envelope
    hum = 0.15 * np.sin(2 * np.pi * rng.uniform(60, 120) * t)
    noise = rng.normal(0.0, 0.05, size=n)
    return (rng.uniform(0.3, 0.5) * (tone + hum + noise)).astype(np.float32)


_FORMATS = {"mp4": "mp4", "mkv": "matroska", "webm": "webm", "mov": "mov"}
# audio codec -> (encoder, samples per frame we hand it, sample format); PyAV re-chunks and converts as the
# encoder needs (mp3 1152-sample s32p frames, flac and pcm s16).
_AUDIO_ENCODERS = {
    "aac": ("aac", 1024, "fltp"),
    "opus": ("libopus", 960, "flt"),
    "mp3": ("libmp3lame", 1024, "fltp"),
    "flac": ("flac", 1024, "fltp"),
    "pcm_s16le": ("pcm_s16le", 1024, "fltp"),
}


# Not deadline=realtime for vpx: its positive cpu-used adapts speed to wall-clock time, so files would differ run to
# run under load. "good" at cpu-used 5 is deterministic and as fast.
_VPX = {"deadline": "good", "cpu-used": "5", "threads": "1", "flags": "+bitexact"}
_X264_KEYINT = "keyint={gop}:min-keyint={gop}:scenecut=0"
_X265 = {"preset": "ultrafast", "crf": "28", "x265-params": _X264_KEYINT + ":pools=none:frame-threads=1:log-level=error"}
# video codec -> (encoder, pixel format, options; "{gop}" is the video's keyframe interval). Single-threaded, fixed
# GOP, chosen so a corpus is the same bytes on every run and machine load.
_VIDEO_ENCODERS = {
    "h264": ("libx264", "yuv420p", {"preset": "ultrafast", "crf": "26", "threads": "1", "flags": "+bitexact",
                                    "x264-params": _X264_KEYINT}),
    "vp8": ("libvpx", "yuv420p", _VPX),
    "vp9": ("libvpx-vp9", "yuv420p", {**_VPX, "row-mt": "0"}),
    "hevc": ("libx265", "yuv420p", _X265),
    "hevc10": ("libx265", "yuv420p10le", _X265),
    "mpeg4": ("mpeg4", "yuv420p", {"qscale": "5", "threads": "1", "flags": "+bitexact"}),
    "prores": ("prores_ks", "yuv422p10le", {"profile": "0", "threads": "1", "flags": "+bitexact"}),  # profile 0: proxy
}


def _add_video_stream(out: Any, spec: VideoSpec) -> Any:
    """The video stream of ``spec.video_codec`` (see ``_VIDEO_ENCODERS``)."""
    encoder, pix_fmt, options = _VIDEO_ENCODERS[spec.video_codec]
    options = {k: v.format(gop=spec.keyframe_interval) for k, v in options.items()}
    stream = out.add_stream(encoder, rate=30 if spec.vfr else int(spec.fps or 30), options=options)
    if encoder.startswith("libvpx"):
        stream.bit_rate = 400_000
    stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, pix_fmt
    stream.codec_context.gop_size = spec.keyframe_interval
    if spec.vfr:
        stream.codec_context.time_base = Fraction(1, 1000)
    return stream


def _encode_video(plan: _Plan, path: Path) -> None:
    """Encode ``plan`` to ``path`` (written to ``path.part`` first, so a crash never leaves a half file)."""
    import av

    spec = plan.spec
    rng = np.random.default_rng(plan.render_seed)
    renderer = _FrameRenderer(
        rng, l1_index=int(spec.frame_l1) - 1, num_level1=plan.num_level1, width=spec.width, height=spec.height
    )
    audio = None
    if spec.has_audio:
        assert spec.sample_rate is not None
        audio = _audio_signal(
            rng,
            index=spec.audio_index,
            num_level2=plan.num_level2,
            sample_rate=spec.sample_rate,
            duration_s=spec.duration_s,
        )

    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), "w", format=_FORMATS[spec.container], options={"fflags": "+bitexact"}) as out:
        vstream = _add_video_stream(out, spec)

        astream = None
        audio_packets: list[Any] = []
        if audio is not None:
            assert spec.sample_rate is not None
            codec, chunk, sample_fmt = _AUDIO_ENCODERS[spec.audio_codec or "aac"]
            astream = out.add_stream(codec, rate=spec.sample_rate, layout="mono", options={"flags": "+bitexact"})
            astream.bit_rate = 64_000
            for start in range(0, len(audio), chunk):
                piece = audio[start : start + chunk]
                fr = av.AudioFrame.from_ndarray(piece[None, :], format=sample_fmt, layout="mono")
                fr.sample_rate = spec.sample_rate
                fr.pts = start
                fr.time_base = Fraction(1, spec.sample_rate)
                audio_packets.extend(astream.encode(fr))
            audio_packets.extend(astream.encode(None))

        times = plan.frame_times or [
            k / float(spec.fps or 30) for k in range(round(spec.duration_s * (spec.fps or 30)))
        ]
        a_next = 0
        for k, t in enumerate(times):
            vf = av.VideoFrame.from_ndarray(renderer.frame(t), format="rgb24")
            if spec.vfr:
                vf.pts, vf.time_base = int(round(t * 1000)), Fraction(1, 1000)
            else:
                vf.pts = k
            for pkt in vstream.encode(vf):
                out.mux(pkt)
            # Interleave audio up to the current video time, so players (and our decoder) stream sensibly.
            while a_next < len(audio_packets) and _packet_time(audio_packets[a_next]) <= t:
                out.mux(audio_packets[a_next])
                a_next += 1
        for pkt in vstream.encode(None):
            out.mux(pkt)
        for pkt in audio_packets[a_next:]:
            out.mux(pkt)
    os.replace(tmp, path)


def _packet_time(pkt: Any) -> float:
    return float(pkt.pts * pkt.time_base) if pkt.pts is not None and pkt.time_base is not None else 0.0


def _encode_audio_only(path: Path, *, seed: int, duration_s: float, num_level2: int, index: int) -> None:
    """An mp4 holding one AAC track and no video: what a mislabelled podcast in a video folder looks like."""
    import av

    sr = 22050
    signal = _audio_signal(
        np.random.default_rng(seed), index=index, num_level2=num_level2, sample_rate=sr, duration_s=duration_s
    )
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("aac", rate=sr, layout="mono", options={"flags": "+bitexact"})
        for start in range(0, len(signal), 1024):
            fr = av.AudioFrame.from_ndarray(signal[None, start : start + 1024], format="fltp", layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = sr, start, Fraction(1, sr)
            for pkt in stream.encode(fr):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)


def _encode_no_video_stream(path: Path) -> None:
    """A valid MPEG-TS container whose only stream is a data stream: opens fine, has nothing to decode."""
    import av

    with av.open(str(path), "w", format="mpegts", options={"fflags": "+bitexact"}) as out:
        stream = out.add_data_stream()
        for i in range(3):
            pkt = av.Packet(f"metadata packet {i}, no pictures here".encode())
            pkt.stream = stream
            pkt.pts = pkt.dts = i * 1000
            pkt.time_base = Fraction(1, 1000)
            out.mux(pkt)


def _render(plan: _Plan) -> str:
    _encode_video(plan, plan.spec.path)
    return plan.spec.video_id


# --------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------


def _plan_bad(cfg: CorpusConfig, videos_dir: Path) -> tuple[list[_Plan], list[BadSpec], list[dict[str, Any]]]:
    """Plans of the decodable bad inputs (rendered like good videos), every BadSpec, and their annotations."""
    prefix, n2 = cfg.id_prefix, cfg.num_level2_per_level1
    n_classes = cfg.num_level1 * n2
    rng = _video_rng(cfg.seed, prefix, 10**6, salt=1)
    plans: list[_Plan] = []
    specs: list[BadSpec] = []
    annotations: list[dict[str, Any]] = []
    for j, (kind, (suffix, expect_ok)) in enumerate(BAD_KINDS.items()):
        vid = f"{prefix}_bad_{kind}"
        label_idx = int(rng.integers(0, n_classes))
        label = f"{label_idx // n2 + 1:02d}{label_idx % n2 + 1:02d}"
        has_annotation = kind != "missing_annotation"
        index = 10**6 + j  # own rng streams, disjoint from the good videos'
        if kind in ("tiny_clip", "missing_annotation", "emoji_text", "truncated"):
            plan = plan_video(
                cfg,
                index=index,
                video_id=vid,
                label_idx=label_idx,
                duration_s=0.2 if kind == "tiny_clip" else 2.0,
                videos_dir=videos_dir,
                container="mp4",
                vfr=False,
                fps=25,
                has_audio=True,
                silent_audio=False,
                text_override={
                    "title": EMOJI_TEXT["title"],
                    "asr": EMOJI_TEXT["asr"],
                    "ocr": [{"time": 0.1, "text": t} for t in EMOJI_TEXT["ocr"]],
                }
                if kind == "emoji_text"
                else None,
                has_annotation=has_annotation,
            )
            plans.append(plan)
            if plan.annotation is not None:
                annotations.append(plan.annotation)
        else:
            text = _make_text(rng, label_idx % n2, 2.0)
            annotations.append({"id": vid, **text, "category_id": label})
        specs.append(
            BadSpec(
                video_id=vid,
                path=videos_dir / f"{vid}{suffix}",
                kind=kind,
                expect_ok=expect_ok,
                label=label,
                has_annotation=has_annotation,
                batch=prefix,
            )
        )
    return plans, specs, annotations


def _write_bad_files(cfg: CorpusConfig, specs: list[BadSpec], plans: dict[str, _Plan]) -> None:
    rng = _video_rng(cfg.seed, cfg.id_prefix, 10**6, salt=2)
    for spec in specs:
        if spec.kind == "zero_byte":
            spec.path.write_bytes(b"")
        elif spec.kind == "random_bytes":
            spec.path.write_bytes(rng.integers(0, 256, size=64 * 1024, dtype=np.uint8).tobytes())
        elif spec.kind == "truncated":
            # Encode a good clip, keep its first half: the moov atom (at the end) is gone.
            good = plans[spec.video_id]
            tmp = spec.path.with_name(spec.path.name + ".full")
            _encode_video(good, tmp)
            data = tmp.read_bytes()
            tmp.unlink()
            spec.path.write_bytes(data[: len(data) // 2])
        elif spec.kind == "no_video_stream":
            _encode_no_video_stream(spec.path)
        elif spec.kind == "audio_only":
            _encode_audio_only(
                spec.path,
                seed=int(rng.integers(0, 2**31 - 1)),
                duration_s=2.0,
                num_level2=cfg.num_level2_per_level1,
                index=int(spec.label[2:]) - 1 if spec.label else 0,
            )


# --------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _other_batches(
    cfg: CorpusConfig, existing: CorpusInfo | None, new_ids: list[str], root: Path
) -> tuple[list[VideoSpec], list[BadSpec]]:
    """The videos and bad inputs of the other batches (kept); this batch's old files are deleted. Refuses ids
    that another batch already uses."""
    if existing is None:
        return [], []
    stale = [s for s in [*existing.videos, *existing.bad] if s.batch == cfg.id_prefix]
    for s in stale:
        if s.path.exists():
            s.path.unlink()
    kept_videos = [v for v in existing.videos if v.batch != cfg.id_prefix]
    kept_bad = [b for b in existing.bad if b.batch != cfg.id_prefix]
    clash = sorted({s.video_id for s in [*kept_videos, *kept_bad]} & set(new_ids))
    if clash:
        raise ValueError(
            f"corpus.id_prefix={cfg.id_prefix!r} gives ids already used by another batch in {root} "
            f"(e.g. {clash[0]!r}); pick a prefix that is not an extension of an existing one"
        )
    return kept_videos, kept_bad


def _render_batch(cfg: CorpusConfig, plans: list[_Plan], bad_plans: list[_Plan], bad_specs: list[BadSpec]) -> None:
    """Encode the batch's videos (in worker processes when ``corpus.workers`` > 1), then write the bad files."""
    # Decodable bad inputs render with the good videos; the truncated one only feeds its own half file.
    to_render = plans + [p for p in bad_plans if not p.spec.video_id.endswith("_bad_truncated")]
    for p in bad_plans:  # bad specs name the final file
        spec = next(b for b in bad_specs if b.video_id == p.spec.video_id)
        p.spec.path = spec.path
    if cfg.workers > 1 and len(to_render) > 1:
        import multiprocessing

        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_render, to_render, chunksize=1))
    else:
        for p in to_render:
            _render(p)
    if cfg.bad_inputs:
        _write_bad_files(cfg, bad_specs, {p.spec.video_id: p for p in bad_plans})


def generate_corpus(cfg: CorpusConfig) -> CorpusInfo:
    """Generate (or add a batch to) the corpus at ``cfg.out``; returns the whole, merged corpus.

    A folder that already holds a corpus keeps every batch whose ``id_prefix`` differs from ``cfg.id_prefix``;
    the taxonomy must match. Re-running with the same prefix replaces that batch (its old files are deleted).
    """
    t0 = time.perf_counter()
    info = CorpusInfo.at(cfg.out)
    info.videos_dir.mkdir(parents=True, exist_ok=True)
    taxonomy = build_taxonomy(cfg.num_level1, cfg.num_level2_per_level1)

    existing: CorpusInfo | None = None
    if info.annotations_path.is_file() and not info.corpus_path.is_file():
        log.warning("%s has no corpus.json: its annotations.json will be replaced, not merged", info.root)
    if info.corpus_path.is_file():
        existing = CorpusInfo.load(info.root)
        if info.taxonomy_path.is_file() and json.loads(info.taxonomy_path.read_text()) != taxonomy:
            raise ValueError(
                f"{info.root} already holds a corpus with another taxonomy: corpus.num_level1 / "
                "corpus.num_level2_per_level1 must match it (or use a fresh corpus.out)"
            )

    # Plan everything first (cheap, deterministic), then render.
    n_classes = cfg.num_level1 * cfg.num_level2_per_level1
    corpus_rng = _video_rng(cfg.seed, cfg.id_prefix, -1 % 2**32)
    labels = corpus_rng.permutation(np.resize(np.arange(n_classes), cfg.videos))  # balanced classes
    durations = _plan_durations(cfg, corpus_rng)
    plans = [
        plan_video(
            cfg,
            index=i,
            video_id=f"{cfg.id_prefix}{i:05d}",
            label_idx=int(labels[i]),
            duration_s=durations[i],
            videos_dir=info.videos_dir,
        )
        for i in range(cfg.videos)
    ]
    bad_plans: list[_Plan] = []
    bad_specs: list[BadSpec] = []
    bad_annotations: list[dict[str, Any]] = []
    if cfg.bad_inputs:
        bad_plans, bad_specs, bad_annotations = _plan_bad(cfg, info.videos_dir)

    new_ids = [p.spec.video_id for p in plans] + [b.video_id for b in bad_specs]
    kept_videos, kept_bad = _other_batches(cfg, existing, new_ids, info.root)
    _render_batch(cfg, plans, bad_plans, bad_specs)

    # Annotations: keep other batches' entries, replace this batch's.
    new_annotations = [p.annotation for p in plans if p.annotation is not None] + bad_annotations
    old_annotations: list[dict[str, Any]] = []
    if info.annotations_path.is_file() and existing is not None:
        drop = {s.video_id for s in [*existing.videos, *existing.bad] if s.batch == cfg.id_prefix} | set(new_ids)
        old_annotations = [a for a in json.loads(info.annotations_path.read_text()) if a["id"] not in drop]
    _write_json_atomic(info.annotations_path, old_annotations + new_annotations)
    _write_json_atomic(info.taxonomy_path, taxonomy)
    info.class_names_path.write_text("".join(f"{c}\t{n}\n" for c, n in taxonomy["level2"].items()), encoding="utf-8")

    info.videos = kept_videos + [p.spec for p in plans]
    info.bad = kept_bad + bad_specs
    info.save()
    log.info(
        "corpus batch %r: %d videos (%.0f s of video) + %d bad inputs written to %s in %.1f s",
        cfg.id_prefix, len(plans), sum(p.spec.duration_s for p in plans), len(bad_specs), info.root,
        time.perf_counter() - t0,
    )  # fmt: skip
    return info


def summarize(info: CorpusInfo) -> dict[str, Any]:
    """Counts a person wants to see after generating: containers and codecs, audio, durations, bad inputs."""
    vids = info.videos
    return {
        "videos": len(vids),
        "containers": dict(Counter(v.container for v in vids)),
        "codecs": dict(Counter(f"{v.video_codec}/{v.audio_codec or '-'}" for v in vids)),
        "no_audio": sum(not v.has_audio for v in vids),
        "silent_audio": sum(v.silent_audio for v in vids),
        "vfr": sum(v.vfr for v in vids),
        "long_over_32s": sum(v.duration_s > LONG_THRESHOLD_S for v in vids),
        "total_duration_s": round(sum(v.duration_s for v in vids), 1),
        "classes": len({v.label for v in vids}),
        "bad_inputs": len(info.bad),
        "bad_must_fail": sum(not b.expect_ok for b in info.bad),
    }


def run(cfg: RaypipeConfig) -> int:
    """CLI stage ``raypipe corpus``."""
    t0 = time.perf_counter()
    info = generate_corpus(cfg.corpus)
    if cfg.corpus.format == "webdataset":
        from raypipe.corpus_webdataset import write_corpus_shards

        write_corpus_shards(info, cfg.corpus.id_prefix, cfg.corpus.samples_per_shard)
    summary = summarize(info)
    log.info("corpus at %s: %s (%.1f s)", info.root, json.dumps(summary), time.perf_counter() - t0)
    log.info("annotations: %s  taxonomy: %s  class names: %s", info.annotations_path, info.taxonomy_path,
             info.class_names_path)  # fmt: skip
    return 0
