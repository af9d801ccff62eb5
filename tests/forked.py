"""``hpcjobs`` commands in processes of their own that do not import TensorFlow again.

A test that must see a separate process (a signal, SIGKILL, an exit code, a second process on
the same run) but not how it starts pays about 3.5 CPU seconds (here) for TensorFlow's and
Keras's imports in every ``python -m hpcjobs`` it spawns.  Here one server per test process imports
them once (nothing more: no op runs, no thread pool starts, so forking it is safe), then forks
a child per command.  The child is what ``python -m hpcjobs ARGS`` is after its imports: it
takes the given environment, working directory and arguments, runs ``hpcjobs.cli.main`` and
ends the way the interpreter ends (its threads joined, its atexit functions run), with
``main``'s exit code.  Signals go straight to its pid; the server reaps it and reports how it
ended.  A command whose environment differs from the server's in a variable read at import
time runs as a real ``python -m hpcjobs`` instead.
"""
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref

# read while TensorFlow, Keras or Python start: a child must not see other values than the server had
AT_IMPORT = ("PYTHONPATH", "PYTHONHASHSEED", "PYTHONWARNINGS", "TF_ENABLE_ONEDNN_OPTS", "TF_USE_LEGACY_KERAS",
             "KERAS_BACKEND", "KERAS_HOME", "TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES")
SERVER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}  # what hpcjobs.cli.main sets first

SERVER = r"""
import json, os, select, signal, sys
import tensorflow, keras, hpcjobs.cli  # the imports every child shares

def serve():
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    replies = os.dup(1)
    buffer = b""
    while True:
        ready, _, _ = select.select([0, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
        while True:  # reap every child that has ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            os.write(replies, f"exit {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
        if 0 in ready:
            chunk = os.read(0, 1 << 20)
            if not chunk:
                return None
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for fd in (wake_r, wake_w, replies):
                        os.close(fd)
                    return json.loads(line)
                os.write(replies, f"pid {pid}\n".encode())

req = serve()
if req is None:
    sys.exit(0)
sys.stdout.flush()
sys.stderr.flush()
null = os.open(os.devnull, os.O_RDONLY)
out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if req["err"] else out
os.dup2(null, 0)
os.dup2(out, 1)
os.dup2(err, 2)
for fd in {null, out, err}:
    os.close(fd)
if req["limit_as"]:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (req["limit_as"], req["limit_as"]))
os.environ.clear()
os.environ.update(req["env"])
os.chdir(req["cwd"])
sys.argv = [os.path.join(os.path.dirname(hpcjobs.cli.__file__), "__main__.py"), *req["argv"]]  # as python -m
sys.exit(hpcjobs.cli.main(req["argv"]))
"""


class _Server:
    def __init__(self):
        env = {k: v for k, v in os.environ.items() if k not in AT_IMPORT}
        env.update(SERVER_ENV)
        self.env = env
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, env=env, cwd="/")
        self.lock = threading.Lock()
        self.changed = threading.Condition()
        self.pids = []  # pids as the server reports them, in order of the requests
        self.codes = {}  # pid -> exit code (negative: the signal)
        self.dead = False  # the server has ended
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            kind, pid, *rest = line.split()
            with self.changed:
                if kind == "pid":
                    self.pids.append(int(pid))
                else:
                    self.codes[int(pid)] = int(rest[0])
                self.changed.notify_all()
        with self.changed:
            self.dead = True
            self.changed.notify_all()

    def fork(self, request):
        with self.lock, self.changed:
            n = len(self.pids)
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            if not self.changed.wait_for(lambda: len(self.pids) > n or self.dead, 120):
                raise RuntimeError("the fork server did not answer")
            if len(self.pids) == n:
                raise RuntimeError(f"the fork server ended (exit {self.proc.poll()})")
            return self.pids[n]

    def wait(self, pid, timeout):
        with self.changed:
            if not self.changed.wait_for(lambda: pid in self.codes, timeout):
                return None
            return self.codes[pid]

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()


_server = None


def _the_server():
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()
        atexit.register(_server.close)
    return _server


class Forked:
    """A running ``hpcjobs ARGS``, as much like ``subprocess.Popen`` as the tests use it:
    ``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``kill``, ``communicate``.
    Its output goes to files and is read by ``communicate`` (stderr into stdout unless
    ``stderr=True``).  ``limit_as``: its RLIMIT_AS in bytes, set before it runs."""

    def __init__(self, args, env=None, cwd=None, stderr=False, limit_as=None):
        self.args = [str(a) for a in args]
        self.returncode = None
        self._dir = tempfile.mkdtemp(prefix="hpcjobs-forked-")
        weakref.finalize(self, shutil.rmtree, self._dir, True)  # its output, gone with this object
        self._out = os.path.join(self._dir, "out")
        self._err = os.path.join(self._dir, "err") if stderr else None
        env = dict(os.environ if env is None else env)
        server = _the_server()
        if any(env.get(k, SERVER_ENV.get(k)) != server.env.get(k) for k in AT_IMPORT):
            self._server = None

            def limit():
                if limit_as:
                    import resource
                    resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))

            self._proc = subprocess.Popen([sys.executable, "-m", "hpcjobs", *self.args], env=env, cwd=cwd,
                                          stdin=subprocess.DEVNULL, stdout=open(self._out, "w"),
                                          stderr=open(self._err, "w") if stderr else subprocess.STDOUT,
                                          preexec_fn=limit)
            self.pid = self._proc.pid
            return
        self._server = server
        self.pid = server.fork({"argv": self.args, "env": env, "cwd": os.path.abspath(cwd or os.getcwd()),
                                "out": self._out, "err": self._err, "limit_as": limit_as})

    def poll(self):
        return self.wait(timeout=0) if self.returncode is None else self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if self._server is None:
                try:
                    self.returncode = self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    if timeout == 0:
                        return None
                    raise
            else:
                self.returncode = self._server.wait(self.pid, timeout)
                if self.returncode is None and timeout != 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def output(self):
        with open(self._out, errors="replace") as f:
            return f.read()

    def errors(self):
        with open(self._err, errors="replace") as f:
            return f.read()

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.output(), (self.errors() if self._err else None)


def run(args, env=None, cwd=None, timeout=600, limit_as=None) -> subprocess.CompletedProcess:
    """``hpcjobs ARGS`` to its end, as ``subprocess.run(..., capture_output=True, text=True)`` gives it."""
    p = Forked(args, env=env, cwd=cwd, stderr=True, limit_as=limit_as)
    try:
        out, err = p.communicate(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)
