"""``slmkit`` that SIGKILLs itself at a chosen point of a file write: fault injection.

    python kill_driver.py OPERATION N SLMKIT_ARGS...

dies right before the N-th call of OPERATION:

    save     torch.save, after it wrote half of the checkpoint's bytes to the temporary file
    fsync    os.fsync: of a complete temporary file, or of a folder just after a rename
    replace  os.replace: the rename of a temporary file over its target
    link     os.link: the new hard link that becomes latest.pt

So a kill lands exactly where a real one would do the most damage, rather than wherever
a timer happens to fall. Used by test_reliability.py's SIGKILL test.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from typing import Any

import torch

from slmkit.cli import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(operation: str, target: int) -> None:
    """Patch OPERATION to kill this process at its ``target``-th call."""
    calls = 0

    def due() -> bool:
        nonlocal calls
        calls += 1
        return calls == target

    if operation == "save":
        real_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if due():
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                die()
            real_save(obj, f, *args, **kwargs)

        torch.save = save
        return
    real = getattr(os, operation)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if due():
            die()
        return real(*args, **kwargs)

    setattr(os, operation, wrapped)


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
