"""Hub sources stream and ``limit`` applies while reading (issue #12 item 7), tested offline: a local dataset folder of
parquet files goes through the same code as a hub id (``datasets.load_dataset(..., streaming=True)``)."""

from __future__ import annotations

import pytest

import forgetless.data.io as io
from forgetless.data import load_mc_task, load_texts


@pytest.fixture
def parquet_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "hub_like"
    (folder / "data").mkdir(parents=True)
    rows = {"question": [f"What is {i} + 1?" for i in range(50)],
            "choices": [[str(i + 1), str(i + 2), str(i + 3)] for i in range(50)], "answer": [0] * 50,
            "text": ["" if i % 5 == 0 else f"Document number {i}." for i in range(50)]}
    pq.write_table(pa.table(rows), folder / "data" / "train-00000-of-00001.parquet")
    return folder


def test_limit_stops_the_stream(parquet_folder, monkeypatch):
    read = []
    real = io.iter_records

    def counting(*args, **kwargs):
        for record in real(*args, **kwargs):
            read.append(record.line)
            yield record

    monkeypatch.setattr(io, "iter_records", counting)
    monkeypatch.setattr("forgetless.data.text.iter_records", counting)
    texts = load_texts(str(parquet_folder), split="train", limit=7)
    assert texts == [f"Document number {i}." for i in (1, 2, 3, 4, 6, 7, 8)]  # empty rows dropped, 7 kept
    assert len(read) == 9  # the stream stopped at the 7th kept document, not at row 50
    read.clear()
    items = load_mc_task(str(parquet_folder), schema="generic", split="train", limit=4)
    assert [item.choices[item.answer] for item in items] == ["1", "2", "3", "4"]


def test_a_dataset_folder_is_read_through_datasets(parquet_folder):
    assert io.resolve_local(str(parquet_folder), "train") is None  # not a folder of split .jsonl files
    records = io.load_records(str(parquet_folder), split="train", limit=3)
    assert [r.origin for r in records] == [f"{parquet_folder}[train]"] * 3 and [r.line for r in records] == [1, 2, 3]


def test_a_hub_source_is_opened_as_a_stream_and_read_only_as_far_as_the_limit(parquet_folder, monkeypatch):
    """``datasets.load_dataset(..., streaming=True)``: an IterableDataset (nothing downloaded or prepared whole, as
    ``allenai/c4`` would be), pulled one row at a time until ``limit`` documents are kept."""
    import datasets

    real, opened, pulled = datasets.load_dataset, [], []

    def spy(*args, **kwargs):
        rows = real(*args, **kwargs)
        opened.append((kwargs.get("streaming"), isinstance(rows, datasets.IterableDataset)))

        def counted():
            for row in rows:
                pulled.append(row["text"])
                yield row

        return counted()

    monkeypatch.setattr(datasets, "load_dataset", spy)
    assert load_texts(str(parquet_folder), split="train", limit=3) == [f"Document number {i}." for i in (1, 2, 3)]
    assert opened == [(True, True)]
    assert len(pulled) == 4  # row 0 (empty, dropped), then 1, 2, 3: not one row more
