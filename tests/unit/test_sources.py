"""The video sources the README lists besides a plain folder: a glob, a manifest (CSV, JSONL, Parquet) and class
folders. Each is listed from real mp4 files laid out as a user would, joined with the annotations, and each
listed URI decodes with PyAV (the listing is what the embed job hands to its decode tasks)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

from raypipe.config import CorpusConfig, DecodeConfig, SourceConfig
from raypipe.corpus import CorpusInfo, generate_corpus
from raypipe.io.decode import decode_video
from raypipe.io.sources import detect_kind, list_videos


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> CorpusInfo:
    return generate_corpus(CorpusConfig(out=str(tmp_path_factory.mktemp("src")), videos=4, seed=5, max_duration_s=3.0,
                                        long_fraction=0.0))


def _decodes(uri: str) -> bool:
    row = decode_video({"video_id": "x", "source_uri": uri}, DecodeConfig(max_frames=2), image_size=16)
    return row["status"] == "ok" and row["num_frames"] >= 1


def test_glob_lists_only_matching_files_with_ids_relative_to_the_glob_root(videos: CorpusInfo, tmp_path: Path) -> None:
    root = tmp_path / "g"
    (root / "a").mkdir(parents=True)
    mp4 = [v for v in videos.videos if v.path.suffix == ".mp4"][:2]
    for v in mp4:
        shutil.copy(v.path, root / "a" / v.path.name)
    (root / "a" / "notes.txt").write_text("not a video")
    (root / "a" / "skip.mkv").write_bytes(b"\x1aE\xdf\xa3")  # other extension: not matched by *.mp4
    cfg = SourceConfig(uri=f"{root}/*/*.mp4")
    assert detect_kind(cfg) == "glob"
    refs = list_videos(cfg)
    assert [r.video_id for r in refs] == sorted(f"a/{v.path.stem}" for v in mp4)
    assert all(_decodes(r.source_uri) for r in refs)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_relative_uris_ids_text_and_labels(videos: CorpusInfo, tmp_path: Path, fmt: str) -> None:
    """Relative ``uri`` values are relative to the manifest's folder; ``id``, ``text`` and ``labels`` columns are
    read (one label: single-label; ``a|b``: multi-label); a row without ``id`` takes the file stem."""
    (tmp_path / "clips").mkdir()
    picked = videos.videos[:3]
    for v in picked:
        shutil.copy(v.path, tmp_path / "clips" / v.path.name)
    rows = [
        {"uri": f"clips/{picked[0].path.name}", "id": "first", "text": "a title", "labels": "0101"},
        {"uri": str(tmp_path / "clips" / picked[1].path.name), "id": "second", "text": "", "labels": "0101|0202"},
        {"uri": f"clips/{picked[2].path.name}", "id": "", "text": "third", "labels": ""},
    ]
    manifest = tmp_path / f"manifest.{fmt}"
    df = pd.DataFrame(rows)
    if fmt == "csv":
        df.to_csv(manifest, index=False)
    elif fmt == "jsonl":
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        df.to_parquet(manifest)
    cfg = SourceConfig(uri=str(manifest))
    assert detect_kind(cfg) == "manifest"
    refs = {r.video_id: r for r in list_videos(cfg)}
    assert set(refs) == {"first", "second", picked[2].path.stem}
    assert refs["first"].source_uri == str(tmp_path / "clips" / picked[0].path.name)
    assert (refs["first"].title, refs["first"].label, refs["first"].label_l1) == ("a title", "0101", "01")
    assert refs["second"].labels == ["0101", "0202"] and refs["second"].label is None
    assert refs[picked[2].path.stem].title == "third" and refs[picked[2].path.stem].label is None
    assert all(_decodes(r.source_uri) for r in refs.values())


def test_manifest_row_without_uri_is_a_config_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,id\nclip.mp4,a\n,b\n")
    with pytest.raises(ValueError, match=r"row 1: no 'uri' value"):
        list_videos(SourceConfig(uri=str(manifest)))


def test_class_folders_take_the_label_from_the_folder_and_annotations_still_join(
    videos: CorpusInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "classes"
    layout = {"0101": videos.videos[:2], "0202": videos.videos[2:3]}
    for label, specs in layout.items():
        (root / label).mkdir(parents=True)
        for v in specs:
            shutil.copy(v.path, root / label / v.path.name)
    shutil.copy(videos.videos[3].path, root / videos.videos[3].path.name)  # outside any class folder: skipped
    cfg = SourceConfig(uri=str(root), kind="class_folders")
    refs = {r.video_id: r for r in list_videos(cfg)}
    assert refs.keys() == {f"{label}/{v.path.stem}" for label, specs in layout.items() for v in specs}
    assert all(r.label == r.video_id.split("/")[0] and r.label_l1 is None for r in refs.values())
    # annotations are joined by the file stem; their text comes along, the folder's label stays when they have none
    anns = [{"id": videos.videos[0].path.stem, "title": "annotated title"}]
    (tmp_path / "ann.json").write_text(json.dumps(anns))
    joined = {r.video_id: r for r in list_videos(SourceConfig(uri=str(root), kind="class_folders",
                                                              annotations=str(tmp_path / "ann.json")))}
    first = joined[f"0101/{videos.videos[0].path.stem}"]
    assert first.title == "annotated title" and first.label == "0101"
    assert all(_decodes(r.source_uri) for r in refs.values())
    # the same tree as a plain folder (the default kind): unlabelled, with one line saying how to label it, which
    # a tree with a video outside any subfolder (not one folder per class) does not get
    (root / videos.videos[3].path.name).unlink()
    with caplog.at_level(logging.INFO, logger="raypipe.io.sources"):
        plain = list_videos(SourceConfig(uri=str(root), annotations_auto=False))
    assert len(plain) == 3 and all(r.label is None for r in plain)
    assert "3 videos in 2 subfolders (0101, 0202) and no annotations" in caplog.text
    assert "--set embed.source.kind=class_folders" in caplog.text
    caplog.clear()
    shutil.copy(videos.videos[3].path, root / videos.videos[3].path.name)
    with caplog.at_level(logging.INFO, logger="raypipe.io.sources"):
        list_videos(SourceConfig(uri=str(root), annotations_auto=False))
    assert "subfolders" not in caplog.text


def test_a_folder_source_joins_the_annotations_json_beside_it(videos: CorpusInfo, tmp_path: Path) -> None:
    """``raypipe embed --source corpus/videos`` joins ``corpus/annotations.json`` (the WBDC layout) unless
    ``annotations_auto`` is off; an explicit ``annotations`` wins; a folder with no such file lists unlabelled."""
    auto = {r.video_id: r for r in list_videos(SourceConfig(uri=str(videos.videos_dir)))}
    given = {r.video_id: r for r in list_videos(SourceConfig(uri=str(videos.videos_dir),
                                                             annotations=str(videos.annotations_path)))}
    assert auto == given and any(r.label for r in auto.values())
    off = list_videos(SourceConfig(uri=str(videos.videos_dir), annotations_auto=False))
    assert not any(r.label or r.title for r in off)
    bare = tmp_path / "bare" / "videos"
    shutil.copytree(videos.videos_dir, bare)
    assert not any(r.label for r in list_videos(SourceConfig(uri=str(bare))))
