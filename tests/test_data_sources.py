"""Sources: every file type (written by its real writer: json, csv, pyarrow parquet, datasets'
save_to_disk) reads to the same records; the .json reader is incremental; streaming gives the
same tokens as in-memory loading, in constant memory."""

from __future__ import annotations

import csv
import json
import tracemalloc

import pytest

from conftest import tokenizer_for
from peftlab.config import DataConfig
from peftlab.data import sources
from peftlab.data.dataset import build_datasets, stream_examples
from peftlab.data.formats import BadRecords, read_records
from peftlab.data.sources import iter_source
from peftlab.errors import DataError

RECORDS = [{"instruction": f"Question {i}: what is {i} + {i}?", "input": "" if i % 3 else "show work",
            "output": f"It is {2 * i}."} for i in range(30)]


def write_all(tmp_path) -> dict:
    """The same records as every supported source type."""
    out = {}
    out["json"] = tmp_path / "d.json"
    out["json"].write_text(json.dumps(RECORDS, indent=2))
    out["jsonl"] = tmp_path / "d.jsonl"
    out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out["csv"] = tmp_path / "d.csv"
    with out["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(RECORDS)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    out["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), out["parquet"], row_group_size=7)
    datasets = pytest.importorskip("datasets")
    out["save_to_disk"] = tmp_path / "saved"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(out["save_to_disk"]))
    out["dataset_dict"] = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                          "test": datasets.Dataset.from_list(RECORDS[:3])}).save_to_disk(str(out["dataset_dict"]))
    return out


def test_every_source_type_reads_the_same_records(tmp_path):
    paths = write_all(tmp_path)
    for kind, path in paths.items():
        got = [rec for _, rec in iter_source(path)]
        assert got == RECORDS, kind
    test_split = [rec for _, rec in iter_source(paths["dataset_dict"], split="test")]
    assert test_split == RECORDS[:3]
    with pytest.raises(DataError, match="no split 'validation'"):
        list(iter_source(paths["dataset_dict"], split="validation"))


def test_directory_of_files_and_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n")
    (tmp_path / "b.txt").write_text("second doc\n\nthird doc\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert [r for _, r in iter_source(tmp_path)] == [{"text": "first"}, {"text": "second doc"}, {"text": "third doc"}]
    with pytest.raises(DataError, match="unsupported file type"):
        list(iter_source(tmp_path / "notes.md"))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_source(tmp_path / "missing.json"))


def test_incremental_json_reader_across_chunk_boundaries(tmp_path, monkeypatch):
    data = [{"text": "x" * (i * 7 % 50), "n": i, "nested": {"a": [1, 2, {"b": "]"}]}} for i in range(200)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    monkeypatch.setattr(sources, "_CHUNK", 13)  # records cut by the buffer everywhere
    assert [r for _, r in sources.iter_json(path)] == data
    path.write_text('[\n{"text": "a"},\n{"text": "b"}\n{"text": "c"}]')
    with pytest.raises(DataError, match="line 4 column 1: not valid JSON .*expected ',' or ']' after record 1"):
        list(sources.iter_json(path))
    path.write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(DataError, match="not valid JSON"):
        list(sources.iter_json(path))
    path.write_text('{"data": [{"text": "a"}, {"text": "b"}]}')
    assert [r for _, r in sources.iter_json(path)] == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "save_to_disk"])
def test_streaming_gives_the_same_tokens_as_in_memory(tmp_path, kind):
    paths = write_all(tmp_path)
    tok = tokenizer_for("llama")
    cfg = DataConfig(path=str(paths[kind]), template="chatml", eval_split=0, objective="sft", max_length=32)
    memory = build_datasets(cfg, tok, seed=0).train
    streamed = list(stream_examples(cfg, tok))
    assert [(e.input_ids, e.labels) for e in streamed] == [(e.input_ids, e.labels) for e in memory]
    assert any(e.truncated for e in streamed)


def test_streaming_pretrain_blocks_equal_in_memory(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"Document {i} says " + "words " * (i % 17) for i in range(60)))
    tok = tokenizer_for("gpt2")
    cfg = DataConfig(path=str(path), eval_split=0, objective="pretrain", block_size=16)
    memory = build_datasets(cfg, tok, seed=0)
    assert memory.stats.objective == "pretrain"
    streamed = list(stream_examples(cfg, tok))
    assert [e.input_ids for e in streamed] == [e.input_ids for e in memory.train]
    ids = [t for i in range(60) for t in tok(f"Document {i} says " + "words " * (i % 17)).input_ids
           + [tok.eos_token_id]]
    assert [e.input_ids for e in streamed] == [ids[i:i + 16] for i in range(0, len(ids) - 15, 16)]


def _peak_streaming(path, n_expected) -> int:
    tok = tokenizer_for("gpt2")
    cfg = DataConfig(path=str(path), objective="pretrain", block_size=64, dedup=False)
    tracemalloc.start()
    count = sum(1 for _ in stream_examples(cfg, tok))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count >= n_expected
    return peak


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_streaming_memory_is_constant_in_corpus_size(tmp_path, suffix, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK", 1 << 15)  # the .json read buffer, far below the corpus sizes

    def corpus(n):
        docs = [{"text": f"record {i} " + "lorem ipsum dolor " * 20} for i in range(n)]
        p = tmp_path / f"c{n}{suffix}"
        p.write_text(json.dumps(docs) if suffix == ".json" else "".join(json.dumps(d) + "\n" for d in docs))
        return p

    small, big = corpus(500), corpus(4000)  # ~0.2 MB and ~1.7 MB of text
    assert big.stat().st_size > 7 * small.stat().st_size
    p_small, p_big = _peak_streaming(small, 500), _peak_streaming(big, 4000)
    assert p_big < 1.3 * p_small + 50_000, (p_small, p_big)  # flat, not 8x (in memory: ~30 MB)


def test_bad_line_in_streaming_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": 5}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl line 2: field 'text' must be a string, got int"):
        list(stream_examples(DataConfig(path=str(path), objective="pretrain", block_size=2), tokenizer_for("gpt2")))
    assert len(list(read_records(path, bad=BadRecords()))) == 1


# ---------------------------------------------------------------------------- issue 15: BOM, positions, shapes


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "txt"])
def test_a_utf8_byte_order_mark_is_read_as_nothing(tmp_path, suffix):
    """Excel's "CSV UTF-8" and many Windows editors start the file with EF BB BF."""
    if suffix == "txt":
        plain, with_bom = tmp_path / "d.txt", tmp_path / "bom.txt"
        plain.write_text("first document\nsecond\n")
    else:
        plain = write_all(tmp_path)[suffix]
        with_bom = tmp_path / f"bom.{suffix}"
    with_bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    expected = [r for _, r in iter_source(plain)]
    got = [r for _, r in iter_source(with_bom)]
    assert got == expected and all(not isinstance(r, sources.Bad) for r in got)
    assert not any(str(k).startswith("\ufeff") or str(v).startswith("\ufeff") for r in got for k, v in r.items())


@pytest.mark.parametrize("chunk", [1 << 20, 13])
def test_invalid_json_position_is_pythons(tmp_path, monkeypatch, chunk):
    """The line and column of a truncated or damaged .json file are where Python's json parser
    stops (they used to count from the start of the reader's buffer: column 59 for Python's 243)."""
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    text = json.dumps(RECORDS[:6]) + "\n"
    multi = json.dumps(RECORDS[:3], indent=1)
    path = tmp_path / "d.json"
    cases = [text[:242], text[:120], text[:-3], text[:150] + text[150:].replace(', "output"', ' "output"', 1), multi[:150], multi[:-4],
             multi.replace('"output"', "output", 2)]
    for broken in cases:
        path.write_text(broken)
        with pytest.raises(json.JSONDecodeError) as ref:
            json.loads(broken)
        with pytest.raises(DataError) as ours:
            list(sources.iter_json(path))
        want = f"{path} line {ref.value.lineno} column {ref.value.colno}: "
        assert str(ours.value).startswith(want), (broken[-30:], str(ours.value), want)


def test_nul_bytes_in_a_text_file_are_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"a good line\nanother\nbin\x00ary junk\n")
    with pytest.raises(DataError, match=r"corpus.txt line 3: .*NUL"):
        list(read_records(path))
    assert len(list(read_records(path, bad=BadRecords()))) == 2  # skippable like any bad record


def test_a_top_level_json_object_is_refused_unless_it_holds_data(tmp_path):
    """One object used to become one record: a dict of splits or of ids trained on a single example."""
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": RECORDS[:3], "test": RECORDS[3:5]}))
    with pytest.raises(DataError, match=r"d.json: the file holds one JSON object.*\[\{\.\.\.\}, \.\.\.\].*\"data\".*'train'"):
        list(iter_source(path))
    path.write_text(json.dumps(RECORDS[0]))
    with pytest.raises(DataError, match=r"d.json: the file holds one JSON object .*instruction"):
        list(iter_source(path))
    path.write_text("\ufeff" + json.dumps({"data": RECORDS[:3]}))
    assert [r for _, r in iter_source(path)] == RECORDS[:3]
