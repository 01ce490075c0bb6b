"""Smoke test of nsdf/openvisus: write a small IDX dataset, read it back, compare.

Usage: python3 /opt/nsdf/idx_smoke.py [DIR]   (DIR: where to write; a new temporary one if not given)
Prints one line, "idx ok: ..." with the dataset's path, shape, dtype and checksum; exits 1 on a mismatch.
"""
import os
import sys
import tempfile

import numpy as np
import OpenVisus as ov

where = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="idx-smoke-")
url = os.path.join(where, "smoke", "smoke.idx")
data = np.arange(16 * 32 * 8, dtype=np.float32).reshape(8, 32, 16)   # z, y, x
db = ov.CreateIdx(url=url, dim=3, data=data)
back = ov.LoadDataset(url).read()
if back.shape != data.shape or back.dtype != data.dtype or not np.array_equal(back, data):
    print(f"idx MISMATCH: wrote {data.shape} {data.dtype}, read {back.shape} {back.dtype}", file=sys.stderr)
    sys.exit(1)
print(f"idx ok: {url} shape={back.shape} dtype={back.dtype} sum={float(back.sum()):.0f}")
