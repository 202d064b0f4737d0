"""Turn the project's own errors into one clear message and exit code 2, never a traceback."""
from __future__ import annotations

import contextlib
import errno
import sys

from adapt.checkpoint import CheckpointError
from adapt.config import ConfigError
from adapt.data import DataError
from adapt.model import ModelLoadError
from adapt.train import TrainingError

USER_ERRORS = (ConfigError, CheckpointError, DataError, ModelLoadError, TrainingError)


@contextlib.contextmanager
def friendly(*more: type[BaseException]):
    """User errors (USER_ERRORS and `more`) become one message and exit 2; anything else is a bug."""
    try:
        yield
    except USER_ERRORS + more as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            print(f"error: disk full while writing {err.filename or ''}; free space or point "
                  f"run.output_dir elsewhere, then rerun to resume from the last complete checkpoint",
                  file=sys.stderr)
            raise SystemExit(2) from None
        raise
