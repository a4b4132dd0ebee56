"""Writes caption sources the way users' tools write them, for the
coordinator's caption-source tests (coordinator/tests/caption_sources*.rs)
and the memory measurement in README ("Caption sources").

    python make_caption_files.py OUT_DIR            # the small test files
    python make_caption_files.py OUT_DIR --rows N   # also big.parquet, N rows

Parquet files come from pyarrow (the writer of Hugging Face datasets), the
WebDataset shards from Python's tarfile in WebDataset's layout (samples of
consecutive members sharing a key). Corrupt copies are made from the good
files at fixed offsets, so every run writes the same bytes.
"""

import argparse
import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

LONG = "word " * 1200  # 6000 bytes: cut to 4096 when read


def write_parquet(out):
    # A dataset-like file: an id, an image column the reader must not load,
    # the captions (with a null, a blank and an over-long one) in 3 row
    # groups of 4 rows, snappy like `datasets`' default.
    captions = [
        "a red circle", "a blue square", None, "   ",
        "a green triangle", LONG, "a yellow star", "two cats",
        "a dog on a beach", "an empty room",
    ]
    table = pa.table({
        "id": pa.array(range(len(captions)), pa.int64()),
        "image": pa.array([bytes([i]) * 300 for i in range(len(captions))], pa.binary()),
        "caption": pa.array(captions, pa.string()),
    })
    pq.write_table(table, os.path.join(out, "captions.parquet"), row_group_size=4,
                   compression="snappy")
    # zstd, and both `text` and `prompt`: the default order takes `prompt`.
    table = pa.table({
        "text": pa.array(["text one", "text two"], pa.string()),
        "prompt": pa.array(["prompt one", "prompt two"], pa.string()),
    })
    pq.write_table(table, os.path.join(out, "prompts.parquet"), compression="zstd")
    # A binary column with an invalid UTF-8 value, and a required column.
    schema = pa.schema([pa.field("caption", pa.binary(), nullable=False)])
    table = pa.table({"caption": [b"valid bytes", b"bad \xff\xfe bytes", b"more"]}, schema=schema)
    pq.write_table(table, os.path.join(out, "binary.parquet"))
    # No caption column at all.
    table = pa.table({"url": ["http://x/1.jpg"], "width": pa.array([512], pa.int32())})
    pq.write_table(table, os.path.join(out, "no_text.parquet"))
    # A number where the caption should be.
    table = pa.table({"caption": pa.array([1, 2], pa.int64())})
    pq.write_table(table, os.path.join(out, "numbers.parquet"))
    corrupt_row_group(os.path.join(out, "captions.parquet"), os.path.join(out, "corrupt.parquet"))


def corrupt_row_group(good, bad):
    # Overwrite the middle of row group 1's caption column chunk (its page
    # data, past the header) with a byte pattern; the footer stays intact.
    meta = pq.ParquetFile(good).metadata
    column = meta.row_group(1).column(2)
    start = column.dictionary_page_offset or column.data_page_offset
    size = column.total_compressed_size
    data = bytearray(open(good, "rb").read())
    for i in range(start + size // 3, start + size - 4):
        data[i] = 0xA5
    with open(bad, "wb") as f:
        f.write(bytes(data))


def add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(payload))


def write_webdataset(out):
    samples = [
        ("shard/000000", {"jpg": b"\xff\xd8" + b"\0" * 2000, "txt": b"a photo of a cat\n"}),
        ("shard/000001", {"jpg": b"\xff\xd8" + b"\1" * 2000,
                          "json": json.dumps({"caption": "a photo of a dog", "alt": "alt text of a dog", "w": 512}).encode()}),
        # .txt wins over .json.
        ("shard/000002", {"json": json.dumps({"caption": "not this"}).encode(),
                          "txt": b"a bird in a tree"}),
        ("shard/000003", {"jpg": b"\xff\xd8"}),  # no caption member
        ("shard/000004", {"txt": b"  \n"}),  # blank
        ("shard/000005", {"json": b"{not json"}),
        ("shard/000006", {"json": json.dumps({"prompt": "a red car"}).encode()}),
        ("shard/000007", {"json": json.dumps({"width": 3}).encode()}),  # no field
        ("shard/000008", {"txt": b"bad \xff utf-8"}),
        ("shard/000009", {"jpg": b"\xff\xd8" + b"\2" * 5000, "txt": b"a house by a lake"}),
    ]
    path = os.path.join(out, "shard-000000.tar")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for ext, payload in members.items():
                add(tar, f"{key}.{ext}", payload)
    # Cut inside sample 9's image (after 9 samples' members).
    data = open(path, "rb").read()
    cut = data.index(b"\xff\xd8" + b"\2" * 100) + 1000
    with open(os.path.join(out, "truncated.tar"), "wb") as f:
        f.write(data[:cut])


def write_big(out, rows):
    # Captions like LAION's: 40..160 bytes, in row groups as `datasets`
    # writes them (pyarrow's default of 1Mi rows per group is capped here
    # at 100k so the reader's streaming is exercised).
    words = ["a", "photo", "of", "the", "red", "cat", "sitting", "on", "wooden", "table",
             "near", "window", "with", "sunlight", "painting", "style", "detailed", "city"]
    batch, done = 100_000, 0
    schema = pa.schema([pa.field("caption", pa.string())])
    with pq.ParquetWriter(os.path.join(out, "big.parquet"), schema, compression="snappy") as w:
        while done < rows:
            n = min(batch, rows - done)
            caps = [
                " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(8 + (i % 20))) + f" #{i}"
                for i in range(done, done + n)
            ]
            w.write_table(pa.table({"caption": caps}, schema=schema))
            done += n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    write_parquet(args.out)
    write_webdataset(args.out)
    if args.rows:
        write_big(args.out, args.rows)


if __name__ == "__main__":
    main()
