"""Turn the project's own errors into one clear message and exit code 2, never a traceback."""
from __future__ import annotations

import contextlib
import errno
import signal
import sys

from adapt.train.checkpoint import CheckpointError
from adapt.recipe.config import ConfigError
from adapt.data.corpus import DataError
from adapt.model.causal import ModelLoadError


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to try."""


class StoppedBeforeStart(BaseException):
    """A stop signal (Ctrl-C, SIGTERM) arrived before this launch's first optimizer step (loading, the evaluation
    before training): there is nothing new to save, so the launch stops at once. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way up swallows it; cleanup (the run's LOCK) runs."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} before the first training step of this launch: "
                         f"nothing new was trained or saved, and every complete checkpoint is intact. Rerun the same "
                         f"command to resume from the last complete checkpoint (or to start, when there is none)")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's code for a process its signal ended (130 for Ctrl-C)."""
        return 128 + self.signum


USER_ERRORS = (ConfigError, CheckpointError, DataError, ModelLoadError, TrainingError)


@contextlib.contextmanager
def friendly(*more: type[BaseException]):
    """User errors (USER_ERRORS and `more`) become one message and exit 2; anything else is a bug."""
    try:
        yield
    except USER_ERRORS + more as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as err:
        if not _peer_lost(err):
            raise
        print(f"error: another rank stopped answering ({str(err).splitlines()[0][:300]}): it died or hangs, or "
              f"the network failed; waited dist.timeout_s. Complete checkpoints are intact: rerun the same "
              f"command to resume from the last one", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            print(f"error: disk full while writing {err.filename or ''}; free space or point "
                  f"run.output_dir elsewhere, then rerun to resume from the last complete checkpoint",
                  file=sys.stderr)
            raise SystemExit(2) from None
        raise


PEER_LOST = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
             "communicator was aborted", "Watchdog caught collective operation timeout")
"""What gloo and NCCL say (in a RuntimeError or torch.distributed.DistError) when a peer rank died or hangs."""


def _peer_lost(err: RuntimeError) -> bool:
    import torch.distributed as dist

    return isinstance(err, getattr(dist, "DistNetworkError", ())) or any(w in str(err) for w in PEER_LOST)
