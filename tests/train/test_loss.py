"""How the loss positions of a step are cut into vocabulary-projection chunks."""

from __future__ import annotations

import pytest

from tuneforge.train.loss import ROUND, _chunk_rows


@pytest.mark.parametrize("n", [1, 31, 33, 100, 140, 231, 256, 257, 600, 1000])
def test_chunks_are_few_full_and_of_few_shapes(n):
    rows = _chunk_rows(n, 256)
    assert rows % ROUND == 0 and ROUND <= rows <= 256
    chunks = -(-n // rows)
    assert chunks == -(-n // 256)  # no more chunks than 256-row ones would need
    assert rows - ROUND < -(-n // chunks)  # padding of the chunks stays under ROUND rows each


def test_a_small_limit_is_kept_and_no_positions_still_make_a_buffer():
    assert _chunk_rows(100, 7) == 7
    assert _chunk_rows(0, 256) == ROUND
