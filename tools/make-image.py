#!/usr/bin/env python3
"""make-image.py PATH MIB: a throwaway memory image of MIB MiB, one page in four zero, the rest
random (what tools/handover-compare.sh and tools/restore-compare.sh restore)."""
import os
import sys

path, mib = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    zero = bytes(4096)
    for i in range(mib * 256):
        f.write(zero if i % 4 == 0 else os.urandom(4096))
