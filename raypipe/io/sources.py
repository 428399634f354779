"""List a video corpus as :class:`VideoRef` rows with stable ids, joined with sidecar text and labels.

Listing is metadata only (no video bytes are read), so it runs on the driver; decoding happens in Ray tasks.
Ids: the file path relative to the source root without its extension (the file stem for flat folders, which is
what WBDC annotation ids and Kinetics clip ids are); a manifest ``id`` column wins when present. WebDataset
shards (:mod:`raypipe.io.webdataset`): the sample key, or ``<shard>/<key>`` for a key an earlier shard (in sorted
shard order) already holds, so ids never change when shards are appended (``embed.source.webdataset.ids``).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

from raypipe.config import SourceConfig, StorageConfig
from raypipe.io.fs import resolve, to_uri
from raypipe.io.text import flatten_ocr
from raypipe.io.webdataset import ShardIndex, TarSample, index_shards, looks_like_shards
from raypipe.schema import level1_of

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")
_MANIFEST_EXT = (".csv", ".jsonl", ".json", ".parquet", ".pq")


@dataclass
class VideoRef:
    video_id: str
    source_uri: str
    title: str = ""
    asr: str = ""
    ocr: str = ""
    label: str | None = None
    label_l1: str | None = None
    labels: list[str] = field(default_factory=list)
    # A member of a WebDataset tar (``source_uri`` is ``<tar uri>#<member name>``): where its bytes are.
    tar_offset: int = -1
    tar_size: int = -1
    # Set when the listing already knows the video cannot be decoded (e.g. video2dataset's "failed_to_download"):
    # it becomes an error row with this reason, without a decode try.
    fail_reason: str = ""
    fail_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _label_str(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, int | float) and float(value).is_integer() and 0 <= int(value) < 10000:
        return f"{int(value):04d}"  # WBDC category ids are 4-digit codes; JSON may drop a leading zero
    return str(value)


def detect_kind(cfg: SourceConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    uri = cfg.uri
    if looks_like_shards(uri):
        return "webdataset"
    if any(c in uri for c in _GLOB_CHARS):
        return "glob"
    if uri.lower().endswith(_MANIFEST_EXT):
        return "manifest"
    if uri.lower().endswith(".zip"):
        return "wbdc_features"
    if uri.lower().endswith((".tfrecord", ".tfrecords")):
        return "yt8m"
    if uri.startswith("s3://"):
        return "s3"
    return "folder"


def load_annotations(uri: str, storage: StorageConfig | None = None) -> dict[str, dict[str, Any]]:
    """WBDC annotations JSON (list of ``{id, title, asr, ocr, category_id}``) keyed by id."""
    fs, path = resolve(uri, storage)
    with fs.open(path, "rb") as f:
        data = json.load(f)
    if isinstance(data, dict):  # tolerate {"annotations": [...]} or {id: {...}}
        data = data.get("annotations", [dict(v, id=k) for k, v in data.items()])
    if not isinstance(data, list):
        raise ValueError(f"annotations {uri}: expected a JSON list of objects with an 'id'")
    return {str(a["id"]): a for a in data if isinstance(a, dict) and "id" in a}


def ref_from_annotation(video_id: str, uri: str, ann: dict[str, Any] | None) -> VideoRef:
    """A VideoRef carrying one WBDC-style annotation (title/asr/ocr/category_id); shared by the video listing
    and the feature importers (:mod:`raypipe.embed.importers`) so both read annotations the same way."""
    if not ann:
        return VideoRef(video_id=video_id, source_uri=uri)
    label = _label_str(ann.get("category_id"))
    return VideoRef(
        video_id=video_id,
        source_uri=uri,
        title=str(ann.get("title") or ""),
        asr=str(ann.get("asr") or ""),
        ocr=flatten_ocr(ann.get("ocr")),
        label=label,
        label_l1=level1_of(label),
    )


def _strip_ext(rel: str) -> str:
    root, _ = posixpath.splitext(rel)
    return root


def _files_under(fs: Any, root: str, extensions: list[str]) -> list[str]:
    exts = tuple(e.lower() for e in extensions)
    found = fs.find(root)
    return sorted(p for p in found if p.lower().endswith(exts) and not posixpath.basename(p).startswith("."))


def _list_folder(cfg: SourceConfig, storage: StorageConfig | None, class_folders: bool) -> list[VideoRef]:
    fs, root = resolve(cfg.uri, storage)
    if not fs.exists(root):
        raise FileNotFoundError(f"embed.source.uri: {cfg.uri} does not exist")
    refs = []
    for p in _files_under(fs, root, cfg.extensions):
        rel = posixpath.relpath(p, root)
        ref = VideoRef(video_id=_strip_ext(rel), source_uri=to_uri(fs, p))
        if class_folders:
            parts = rel.split("/")
            if len(parts) < 2:
                log.warning("class folders: %s is not inside a class folder; skipped", p)
                continue
            ref.label = parts[0]
        refs.append(ref)
    return refs


def _hint_class_folders(refs: list[VideoRef]) -> None:
    """Say how to label videos that sit one folder per class: a plain folder source lists them unlabelled (a
    folder per night or camera is as common, so the folder names are not taken as labels unasked)."""
    tops = {r.video_id.split("/", 1)[0] for r in refs}
    if len(tops) >= 2 and all("/" in r.video_id for r in refs):
        shown = ", ".join(sorted(tops)[:4]) + (" ..." if len(tops) > 4 else "")
        log.info("%d videos in %d subfolders (%s) and no annotations: they are embedded without labels; "
                 "--set embed.source.kind=class_folders labels each by its folder", len(refs), len(tops), shown)


def _list_glob(cfg: SourceConfig, storage: StorageConfig | None) -> list[VideoRef]:
    fs, pattern = resolve(cfg.uri, storage)
    prefix = pattern.split("*")[0].split("?")[0].split("[")[0]
    root = prefix if prefix.endswith("/") else posixpath.dirname(prefix)
    exts = tuple(e.lower() for e in cfg.extensions)
    refs = []
    for p in sorted(fs.glob(pattern)):
        if fs.isdir(p) or not p.lower().endswith(exts):
            continue
        refs.append(VideoRef(video_id=_strip_ext(posixpath.relpath(p, root.rstrip("/") or "/")), source_uri=to_uri(fs, p)))
    return refs


def _sample_value(sample: TarSample, key: str) -> Any:
    if key == "txt":
        return sample.txt
    cur: Any = sample.meta
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _first_value(sample: TarSample, keys: list[str]) -> Any:
    for key in keys:
        value = _sample_value(sample, key)
        if value not in (None, "", [], {}):
            return value
    return None


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return flatten_ocr(value) if all(isinstance(v, dict) for v in value) else " ".join(str(v) for v in value)
    return str(value)


def _ref_from_sample(shard: ShardIndex, sample: TarSample, video_id: str, cfg: SourceConfig) -> VideoRef:
    """One sample as a VideoRef: text and labels from its JSON/TXT members, failures decided here (no decode)."""
    opts = cfg.webdataset
    exts = [e.lstrip(".").lower() for e in cfg.extensions]
    video = next((sample.members[e] for e in exts if e in sample.members), None)
    member = video or next(iter(sample.members.values()))
    ref = VideoRef(
        video_id=video_id, source_uri=f"{shard.uri}#{member.name}",
        title=_as_text(_first_value(sample, opts.title_keys)), asr=_as_text(_first_value(sample, opts.asr_keys)),
        ocr=_as_text(_first_value(sample, opts.ocr_keys)),
    )
    labels = _first_value(sample, opts.label_keys)
    if isinstance(labels, list) and len(labels) != 1:
        ref.labels = [str(x) for x in labels]
    elif labels is not None:
        ref.label = _label_str(labels[0] if isinstance(labels, list) else labels)
        ref.label_l1 = level1_of(ref.label)
    status = str(sample.meta.get("status") or "success")
    if status != "success":  # video2dataset: failed_to_download / failed_to_subsample
        ref.fail_reason, ref.fail_error = status, str(sample.meta.get("error_message") or status)
    elif video is None:
        ref.fail_reason = "no_video_member"
        ref.fail_error = f"sample {sample.key!r} of {shard.uri} has no member with an extension of {cfg.extensions}"
    elif video.truncated:
        ref.fail_reason, ref.fail_error = "truncated", f"{shard.uri}: {shard.error}"
    else:
        ref.tar_offset, ref.tar_size = video.offset, video.size
    if sample.meta_error:
        log.warning("webdataset: %s: metadata not read: %s", ref.source_uri, sample.meta_error)
    return ref


def _list_webdataset(cfg: SourceConfig, storage: StorageConfig | None) -> list[VideoRef]:
    """Every sample of every shard; a shard that yields no sample at all (not a tar, empty, cut in its first
    header) is one error row named after the shard, so it is reported once and not retried on every run."""
    refs: list[VideoRef] = []
    owner: dict[str, str] = {}  # key -> the first shard (sorted order) that holds it
    for shard in index_shards(cfg.uri, storage):
        if not shard.samples and shard.error:
            refs.append(VideoRef(video_id=f"{shard.name}.tar", source_uri=shard.uri, fail_reason="unreadable_shard",
                                 fail_error=shard.error))
            continue
        for sample in shard.samples:
            first = owner.setdefault(sample.key, shard.name)
            vid = sample.key if cfg.webdataset.ids == "key" and first == shard.name else f"{shard.name}/{sample.key}"
            refs.append(_ref_from_sample(shard, sample, vid, cfg))
    return refs


def _read_manifest(uri: str, storage: StorageConfig | None) -> list[dict[str, Any]]:
    import pandas as pd

    fs, path = resolve(uri, storage)
    with fs.open(path, "rb") as f:
        raw = f.read()
    low = path.lower()
    if low.endswith(".csv"):
        df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    elif low.endswith((".jsonl", ".json")):
        df = pd.read_json(io.BytesIO(raw), lines=low.endswith(".jsonl"), dtype=False)
    else:
        df = pd.read_parquet(io.BytesIO(raw))
    return df.to_dict("records")


def _list_manifest(cfg: SourceConfig, storage: StorageConfig | None) -> list[VideoRef]:
    rows = _read_manifest(cfg.uri, storage)
    fs, mpath = resolve(cfg.uri, storage)
    base = posixpath.dirname(mpath)
    refs = []
    for i, row in enumerate(rows):
        uri = row.get(cfg.manifest_uri_column)
        if not uri:
            raise ValueError(f"manifest {cfg.uri} row {i}: no '{cfg.manifest_uri_column}' value")
        uri = str(uri)
        if "://" not in uri and not uri.startswith("/"):
            uri = to_uri(fs, posixpath.join(base, uri))
        vid = row.get(cfg.manifest_id_column)
        vid = str(vid) if vid not in (None, "") else _strip_ext(posixpath.basename(uri))
        labels_raw = row.get(cfg.manifest_labels_column, row.get("label"))
        if isinstance(labels_raw, str):
            labels = [s for s in labels_raw.replace(";", "|").split("|") if s]
        elif labels_raw is None or (isinstance(labels_raw, float) and labels_raw != labels_raw):
            labels = []
        elif hasattr(labels_raw, "__iter__"):
            labels = [str(x) for x in labels_raw]
        else:
            labels = [_label_str(labels_raw) or ""]
        ref = VideoRef(video_id=vid, source_uri=uri, title=str(row.get(cfg.manifest_text_column) or ""))
        if len(labels) == 1:
            ref.label = labels[0]
            ref.label_l1 = level1_of(ref.label)
        elif labels:
            ref.labels = labels
        refs.append(ref)
    return refs


ANNOTATIONS_FILE = "annotations.json"


def _annotations_beside(cfg: SourceConfig, kind: str, storage: StorageConfig | None) -> str | None:
    """``annotations.json`` in a folder source or its parent (the WBDC layout, and what ``raypipe corpus`` writes),
    when ``embed.source.annotations`` is unset and ``annotations_auto`` is on.

    Why: a user who points embed at ``corpus/videos`` expects the titles and labels that sit beside the videos;
    without them every row is unlabelled and training fails two commands later. The join is logged.
    """
    if not cfg.annotations_auto or kind not in ("folder", "s3", "class_folders"):
        return None
    fs, root = resolve(cfg.uri, storage)
    root = root.rstrip("/")
    for folder in (root, posixpath.dirname(root)):
        path = posixpath.join(folder, ANNOTATIONS_FILE)
        if folder and fs.isfile(path):
            uri = to_uri(fs, path)
            log.info("using annotations %s found beside the videos (embed.source.annotations_auto=false to skip)", uri)
            return uri
    return None


def list_videos(source_cfg: SourceConfig, storage: StorageConfig | None = None) -> list[VideoRef]:
    """Every video of the source, sorted by id, with annotations (when configured) joined by id.

    Raises ``FileNotFoundError`` / ``ValueError`` for a missing source or a malformed manifest (a config problem,
    reported before any Ray work), never for a bad video (that is the decoder's job).
    """
    kind = detect_kind(source_cfg)
    if kind in ("folder", "s3"):
        refs = _list_folder(source_cfg, storage, class_folders=False)
    elif kind == "class_folders":
        refs = _list_folder(source_cfg, storage, class_folders=True)
    elif kind == "glob":
        refs = _list_glob(source_cfg, storage)
    elif kind == "manifest":
        refs = _list_manifest(source_cfg, storage)
    elif kind == "webdataset":
        refs = _list_webdataset(source_cfg, storage)
    else:
        raise ValueError(f"embed.source.kind={kind!r} is a feature corpus: import it, it has no videos to list")
    seen: dict[str, str] = {}
    for r in refs:
        if r.video_id in seen:
            raise ValueError(f"duplicate video id {r.video_id!r}: {seen[r.video_id]} and {r.source_uri}")
        seen[r.video_id] = r.source_uri
    annotations = source_cfg.annotations or _annotations_beside(source_cfg, kind, storage)
    if annotations:
        anns = load_annotations(annotations, storage)
        joined = []
        for r in refs:
            ann = anns.get(r.video_id) or anns.get(posixpath.basename(r.video_id))
            if ann is not None:
                j = ref_from_annotation(r.video_id, r.source_uri, ann)
                j.label = j.label or r.label
                j.label_l1 = j.label_l1 or level1_of(j.label)
                j.labels = r.labels
                j.tar_offset, j.tar_size, j.fail_reason, j.fail_error = r.tar_offset, r.tar_size, r.fail_reason, r.fail_error
                if not j.title:
                    j.title = r.title
                r = j
            joined.append(r)
        log.info("joined annotations: %d of %d videos annotated", sum(1 for r in joined if r.title or r.label), len(refs))
        refs = joined
    if kind in ("folder", "s3") and not annotations:
        _hint_class_folders(refs)
    refs.sort(key=lambda r: r.video_id)
    if source_cfg.limit:
        refs = refs[: source_cfg.limit]
    return refs
