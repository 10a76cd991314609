"""A samples.parquet of several row groups reads whole (pyarrow cannot read nested dictionary columns of
several row groups at once: every real cache of more than a few hundred samples has several)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from genrecal_cache.format.safety import DICTIONARY_COLUMNS, read_index


def test_index_of_several_row_groups_reads_every_row(tmp_path: Path):
    rows = {"id": [f"s{i}" for i in range(7)], "image_refs": [[f"img{i}.png", f"b{i}.png"] for i in range(7)]}
    path = tmp_path / "samples.parquet"
    pq.write_table(pa.table(rows), path, row_group_size=3)
    pf = pq.ParquetFile(path, read_dictionary=[c for c in DICTIONARY_COLUMNS if c.split(".")[0] in rows])
    assert pf.metadata.num_row_groups == 3
    table = read_index(pf, ["id", "image_refs"], str(path))
    assert table.to_pydict() == rows
