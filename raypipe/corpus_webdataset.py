"""The generated corpus as WebDataset shards, laid out as video2dataset writes a download (``corpus.format``).

Each video of a batch (good and bad inputs alike) becomes one sample ``<video_id>.<mp4|mkv|webm>`` with a
``.json`` member holding video2dataset's fields (``key``, ``status``, ``error_message``, ``url``, ``caption``) plus
the WBDC annotation (``title``, ``asr``, ``ocr``, ``category_id``) and a ``.txt`` caption (the title); unannotated
videos carry only video2dataset's fields. With ``bad_inputs``, one more sample stands for a failed download: no
video member and ``"status": "failed_to_download"``. Shards are per batch (``shards/<id_prefix>-00000.tar``, ...),
so a second batch adds shards and never rewrites the first batch's: an incremental run picks up only the new ones.

Kept apart from :mod:`raypipe.corpus` (generation) on purpose: it only reads what generation wrote.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypipe.io.fs import resolve
from raypipe.io.webdataset import write_shard

if TYPE_CHECKING:  # annotation only: raypipe.corpus imports this module (format=webdataset), never the reverse
    from raypipe.corpus import CorpusInfo

log = logging.getLogger(__name__)

FAILED_DOWNLOAD_ERROR = "HTTP Error 404: Not Found"


def failed_download_key(id_prefix: str) -> str:
    return f"{id_prefix}_bad_download"


def _sample(video_id: str, path: Path, ann: dict[str, Any] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"url": f"https://videos.example/{path.name}", "key": video_id, "status": "success",
                            "error_message": None}
    sample: dict[str, Any] = {"__key__": video_id, path.suffix.lstrip(".").lower(): path.read_bytes()}
    if ann:
        meta.update({k: v for k, v in ann.items() if k != "id"}, caption=ann.get("title") or "")
        sample["txt"] = str(ann.get("title") or "")
    sample["json"] = meta
    return sample


def corpus_samples(info: CorpusInfo, batch: str) -> list[dict[str, Any]]:
    """The samples of one batch (``id_prefix``) in corpus order, plus the failed download when it has bad inputs."""
    anns = {str(a["id"]): a for a in json.loads(info.annotations_path.read_text(encoding="utf-8"))}
    specs = [s for s in [*info.videos, *info.bad] if s.batch == batch]
    samples = [_sample(s.video_id, s.path, anns.get(s.video_id)) for s in specs]
    if any(b.batch == batch for b in info.bad):
        key = failed_download_key(batch)
        samples.append({"__key__": key, "txt": "a video that could not be downloaded", "json": {
            "url": f"https://videos.example/{key}.mp4", "key": key, "status": "failed_to_download",
            "error_message": FAILED_DOWNLOAD_ERROR, "caption": "a video that could not be downloaded"}})
    return samples


def write_corpus_shards(
    info: CorpusInfo, batch: str, samples_per_shard: int, out: str | None = None, storage: Any = None
) -> list[str]:
    """Write the batch's samples as ``<out>/<batch>-NNNNN.tar`` (+ ``_stats.json``, ``.parquet``); ``out``
    defaults to ``<corpus>/shards``. Returns the tar URIs/paths."""
    fs, folder = resolve(out or str(info.root / "shards"), storage)
    fs.makedirs(folder, exist_ok=True)
    samples = corpus_samples(info, batch)
    paths = [
        write_shard(fs, folder, f"{batch}-{i // samples_per_shard:05d}", samples[i : i + samples_per_shard])
        for i in range(0, len(samples), samples_per_shard)
    ]
    log.info("corpus batch %r as WebDataset: %d samples in %d shards under %s", batch, len(samples), len(paths), folder)
    return paths
