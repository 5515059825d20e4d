"""Small helpers every module shares: one atomic writer, one seeded hash, one kind of user error.

Nothing here knows about distillation; it is imported by the concept modules and never imports them.
"""
import argparse
import glob
import hashlib
import json
import os
import re
import tempfile


class UserError(Exception):
    """A known bad input (a flag, a file): the CLIs print its one-line message and exit 2, no traceback.
    Raise it with a message that names the flag or file and says what to do."""


# -----------------------------------------------------------------------------
# one seeded hash

def seed_from(*keys):
    """A 63-bit seed from a tuple of keys (ints, strings): the same keys give the same seed on every
    machine and run, whatever happened before (no global RNG state), so a resumed run repeats draws."""
    h = hashlib.sha256(repr(tuple(keys)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(*keys, device="cpu"):
    """A torch.Generator seeded by seed_from(*keys)."""
    import torch
    return torch.Generator(device=device).manual_seed(seed_from(*keys))


# -----------------------------------------------------------------------------
# one row-chunk loop

def row_chunks(n, size):
    """(i0, i1) for rows 0..n in chunks of at most `size` rows: the one chunk loop over (rows, V) work, so
    at most `size` rows of logits are alive at once."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [(i, min(n, i + size)) for i in range(0, n, size)]


# -----------------------------------------------------------------------------
# one atomic writer

TMP_PREFIX = ".tmp."


def atomic_write(path, data):
    """Write str or bytes to `path` atomically: a temp file in the same directory, fsync, then
    os.replace, so a reader sees the old file or the whole new one, never a half-written file.
    A failed write removes its temp file; a full disk is named as such."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with _temp_for(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_json(path, obj, indent=2):
    atomic_write(path, json.dumps(obj, indent=indent, default=str) + "\n")


def atomic_torch_save(obj, path):
    """torch.save through a temp file and os.replace (a killed write never corrupts `path`)."""
    import torch
    with _temp_for(path) as tmp:
        torch.save(obj, tmp)


class _temp_for:
    """Context manager: yields a temp path beside `path`; on success it replaces `path`, on any failure
    (an exception, a full disk) it is removed. Temp names start with TMP_PREFIX (see clean_temp_files)."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(self.path) + ".", dir=d)
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                os.chmod(self.tmp, 0o644)  # mkstemp makes 0600; outputs are for sharing
                os.replace(self.tmp, self.path)
                return False
            except BaseException:
                os.remove(self.tmp)
                raise
        if os.path.exists(self.tmp):
            os.remove(self.tmp)
        if disk_full(exc):
            raise UserError(f"disk full while writing {self.path}: free space and rerun "
                            f"(nothing was left half-written)") from None
        return False


def disk_full(exc):
    """True for ENOSPC, also when torch's writer wraps it in a RuntimeError."""
    import errno
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    msg = str(exc)
    return "No space left on device" in msg or ("inline_container" in msg and "unexpected pos" in msg)


def clean_temp_files(directory):
    """Remove temp files a killed writer left in `directory` (not recursive); returns how many."""
    n = 0
    for p in glob.glob(os.path.join(glob.escape(directory), TMP_PREFIX + "*")):
        try:
            os.remove(p)
            n += 1
        except OSError:
            pass
    return n


def read_json(path):
    """json.load with a one-line error naming the file when it is truncated or corrupt."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): the file is corrupt or "
                        "truncated; delete it to have it rebuilt") from None


def read_jsonl(path, what=""):
    """The JSON objects of a .jsonl file, one a line (blank lines skipped): the one JSONL reader. A missing
    file, a binary file, a line that is not JSON or not an object is a one-line UserError naming `what`
    (the flag or the kind of file), the file and the line."""
    name = f"{what} {path}".strip()
    if not os.path.isfile(path):
        raise UserError(f"{name}: " + ("a directory; give a .jsonl file" if os.path.isdir(path) else "no such file"))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: not UTF-8 text at byte {e.start} (a binary file?); need one JSON object a "
                        "line") from None
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: a JSON string may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}: line {n} is not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{name}: line {n} is a JSON {type(row).__name__}, not an object")
        rows.append(row)
    return rows


HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")  # [owner/]name on the Hugging Face hub


def hub_source(repo_id, flag, repo_type="model", cached=False, local="a local path"):
    """Where the hub repo `repo_id` can be read from now: "hub" when the hub answers, "cache" when only this
    machine's Hugging Face cache has it (`cached`). Otherwise a one-line UserError naming `flag` and what
    to do, after one quick query (not a minute of retries): the one check for hub models and datasets."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    env = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if repo_type == "dataset" else ("HF_HUB_OFFLINE",)
    offline = constants.HF_HUB_OFFLINE or any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                                              for v in env)
    why = "offline mode is set"
    if not offline:
        try:
            HfApi().repo_info(repo_id, repo_type=repo_type, timeout=5)
            return "hub"
        except GatedRepoError:
            if not cached:
                raise UserError(f"{flag} {repo_id}: a gated {repo_type}: log in (hf auth login) and accept its "
                                "terms on huggingface.co first") from None
        except RepositoryNotFoundError:
            if not cached:
                raise UserError(f"{flag} {repo_id}: no such {repo_type} on the Hugging Face hub (nor {local})") \
                    from None
        except Exception as e:  # noqa: BLE001 (no network: connection, DNS, timeout, proxy errors)
            why = f"the hub cannot be reached: {type(e).__name__}"
    if cached:
        return "cache"
    get = f"hf download {repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")
    raise UserError(f"{flag} {repo_id}: not {local}, and not in the local Hugging Face cache ({why}): give "
                    f"{local}, or download it first ({get}) on a machine with network, then set HF_HUB_OFFLINE=1")


def git_hash():
    """The commit of this checkout (recorded in config.json), or 'unknown'."""
    import subprocess
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=here, stderr=subprocess.DEVNULL,
                                       text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def writable_dir_problem(path):
    """Why `path` cannot be (or become) a directory this process writes into, or None when it can: an
    empty path, a file, a file among its parents, or a directory without write permission."""
    if not str(path).strip():
        return "is empty: name a directory"
    p = os.path.abspath(path)
    while not os.path.exists(p):  # the nearest existing ancestor is where makedirs starts
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        return "is a file, not a directory" if p == os.path.abspath(path) else f"is under {p}, which is a file"
    try:  # a real write: os.access misses read-only mounts and lets root pass everywhere
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe.", dir=p)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"is not writable ({p}: {e.strerror})"
    return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: ...`, exit 2: no usage block in front (-h has it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_cli(main, prog):
    """Run a CLI's main(): a UserError becomes one line on stderr and exit status 2, never a traceback."""
    import sys
    try:
        return main()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
