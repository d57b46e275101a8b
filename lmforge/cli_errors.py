"""The CLI's one user-error handler: every failure a user can cause or fix ends in one line.

`explain` maps an exception to (exit code, line): the library's own errors and the CLI's checks
(the message is the line), storage faults (OSError: the path and what to do, lmforge.storage.
explain), undecodable text, missing devices, memory exhaustion and a package of an extra that is
not installed: exit code 2. Anything else is
an internal error: one line and exit code 1, with the traceback only under `--debug`.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

__all__ = ["USER_ERRORS", "UserError", "check_device", "check_text_arg", "explain", "missing_extra", "resolve_device",
           "user_error_types"]


class UserError(Exception):
    """A bad argument or environment the CLI detected itself; the message is one line."""


# (module, class) of each exception whose message is a complete one-line explanation for the user.
USER_ERRORS = (
    ("lmforge.config.loader", "ConfigError"),
    ("lmforge.checkpoint.errors", "CheckpointError"),
    ("lmforge.compress.errors", "CompressError"),
    ("lmforge.data.errors", "DataError"),
    ("lmforge.eval.errors", "EvalError"),
    ("lmforge.interop.hf.base", "HFFormatError"),
    ("lmforge.interop.onnx.errors", "OnnxError"),
    ("lmforge.observability.errors", "ObservabilityError"),
    ("lmforge.safety.errors", "SafetyError"),
    ("lmforge.serve.early_exit", "EarlyExitError"),
    ("lmforge.serve.exit_gate", "ExitGateError"),
    ("lmforge.serve.generate", "GenerationError"),
    ("lmforge.serve.server.errors", "ServeError"),
    ("lmforge.storage.guard", "DestinationError"),
    ("lmforge.storage.lock", "RunDirBusy"),
    ("lmforge.storage.model_dir", "ModelDirError"),
    ("lmforge.train.stability", "TrainingDivergedError"),
)


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception classes whose message is a complete one-line explanation for the user, from the
    modules already imported: an exception of a class whose module was never loaded cannot have
    been raised, and importing them all (several import torch) made every config error wait ~2 s."""
    loaded = (getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules)
    return (*loaded, UserError)


_OOM = re.compile(r"can't allocate memory|out of memory|Cannot allocate memory|std::bad_alloc", re.IGNORECASE)


_REQUIREMENT = re.compile(r'^(?P<dist>[A-Za-z0-9_.\-]+)[^;]*;\s*extra\s*==\s*"(?P<extra>[^"]+)"')
_MODULE_OF_DIST = {"scikit-learn": "sklearn"}  # where a package's import name is not its name


def missing_extra(exc: ModuleNotFoundError) -> tuple[str, str] | None:
    """(package, extra) when `exc` is an optional dependency that an lmforge extra installs: a
    command whose extra is not installed is the user's to fix, not an internal error. Read from
    the installed package's metadata, so it is pyproject.toml's own list; the test extra last."""
    module = (exc.name or "").split(".")[0]
    try:
        requires = importlib.metadata.requires("lmforge") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = []
    for req in requires:
        m = _REQUIREMENT.match(req)
        if m and _MODULE_OF_DIST.get(m["dist"].lower(), m["dist"].lower().replace("-", "_")) == module:
            found.append((m["dist"], m["extra"]))
    found.sort(key=lambda f: f[1] == "test")
    return found[0] if found else None


def _first_line(e: BaseException) -> str:
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{e.__class__.__name__}: {text}"[:400] if text else e.__class__.__name__


def explain(exc: BaseException, output: Path | str | None = None) -> tuple[int, str]:
    """(exit code, one line) for `exc`; `output`: where the command writes, named when an OSError
    carries no path of its own."""
    from lmforge.storage.explain import describe_os_error

    if isinstance(exc, user_error_types()):
        return 2, " ".join(str(exc).split("\n"))
    if isinstance(exc, OSError):
        return 2, describe_os_error(exc, output)
    extra = missing_extra(exc) if isinstance(exc, ModuleNotFoundError) else None
    if extra is not None:
        return 2, f"this needs the {extra[0]} package, which is not installed: pip install -e '.[{extra[1]}]'"
    if isinstance(exc, UnicodeDecodeError):
        return 2, (f"input is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}: "
                   f"{exc.reason}); pass a UTF-8 text file")
    if isinstance(exc, UnicodeEncodeError):
        return 2, f"text cannot be encoded as {exc.encoding} ({exc.reason} at position {exc.start}); pass UTF-8 text"
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _OOM.search(str(exc))):
        return 2, (f"out of memory ({_first_line(exc)}); make the model or batch smaller (model.dim, "
                   "model.n_layers, train.micro_batch_size, train.seq_len) or spread it over more devices")
    return 1, f"internal error: {_first_line(exc)} (rerun with --debug for the traceback)"


def check_device(spec: str, flag: str) -> str:
    """`spec` when it names a device here ("auto" as it is, without importing torch: config checks
    run before torch loads); a device string torch does not know, or a CUDA device this machine
    lacks, is refused in one line."""
    if spec == "auto":
        return spec
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {spec!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {spec}: no CUDA device is available on this machine "
                            f"(torch {torch.__version__}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{flag} {spec}: MPS is not available on this machine; use cpu")
    elif device.type != "cpu":
        raise UserError(f"{flag} {spec}: lmforge runs on cpu, cuda or mps")
    return spec


def resolve_device(spec: str, flag: str) -> str:
    """The device a verb that loads a model runs on: `spec` checked, "auto" made cuda when this
    machine has one, else cpu."""
    import torch

    spec = check_device(spec, flag)
    return ("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec


def check_text_arg(value: str, flag: str) -> None:
    """Command-line text that is not valid UTF-8 reaches Python as lone surrogates: refuse it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape")
        bad = bytes(b for b in raw if b >= 0x80)[:4].hex(" ")
        raise UserError(f"{flag}: not valid UTF-8 text (bytes {bad}); pass UTF-8 text") from None
