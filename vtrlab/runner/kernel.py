"""The Jupyter kernel notebooks run in: always this environment's Python.

Kernel specs are looked up by name across user, environment and system directories, so a
`python3` spec in ~/.local/share/jupyter could silently run another interpreter. The runner
does not look any spec up: it starts `sys.executable -m ipykernel_launcher` directly, which
works the same in a fresh virtual environment.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import weakref

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager

from vtrlab.runner.interrupt import on_clean_up
from vtrlab.runner.resources import EXEC_LINE

KERNEL_NAME = "python3"  # what papermill records in the executed notebook
_MANAGERS: weakref.WeakSet[KernelManager] = weakref.WeakSet()  # every manager made in this process


def kill_kernels(_grace_s: float = 0.0) -> None:
    """SIGKILL every live kernel of this process and its process group, without the event loop.

    For signal handlers: the kernel runs in a session of its own, so its pid is its group id.
    """
    import signal

    for km in list(_MANAGERS):
        with contextlib.suppress(Exception):
            pid = getattr(getattr(km, "provisioner", None), "pid", None)
            if pid:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            if km.transport == "ipc":
                import shutil

                shutil.rmtree(os.path.dirname(km.ip), ignore_errors=True)


def shutdown_kernels() -> None:
    """Stop every kernel this process started that is still alive (e.g. after SIGINT/SIGTERM).

    Kernels run in a session of their own (jupyter_client), so a signal to the runner's process
    group does not reach them; without this an interrupted run would leave its kernel behind.
    """
    for km in list(_MANAGERS):
        with contextlib.suppress(Exception):  # best effort: the kernel may be exiting already
            if km.has_kernel and km.is_alive():
                km.shutdown_kernel(now=True)


class VenvKernelManager(KernelManager):
    def __init__(self, **kwargs):
        # IPC sockets in a private directory instead of TCP ports: jupyter_client picks a free TCP
        # port by binding and releasing it, so kernels started in parallel (grid jobs) can race
        # for the same port and one dies with "Address already in use".
        kwargs.setdefault("transport", "ipc")
        kwargs.setdefault("ip", os.path.join(tempfile.mkdtemp(prefix="vtrlab-kernel-"), "kernel"))
        super().__init__(**kwargs)
        _MANAGERS.add(self)

    def cleanup_resources(self, restart: bool = False) -> None:
        super().cleanup_resources(restart=restart)  # removes the socket files
        if not restart:
            try:
                os.rmdir(os.path.dirname(self.ip))
            except OSError:
                pass

    @property
    def kernel_spec(self) -> KernelSpec:
        if self._kernel_spec is None:
            self._kernel_spec = KernelSpec(
                # log level CRITICAL: keep the kernel's start-up warnings out of the one-line reports
                argv=[
                    sys.executable,
                    "-m",
                    "ipykernel_launcher",
                    "--IPKernelApp.log_level=CRITICAL",
                    f"--IPKernelApp.exec_lines={EXEC_LINE}",  # peak memory into run.json (runner.resources)
                    "-f",
                    "{connection_file}",
                ],
                display_name=f"Python {sys.version_info.major}.{sys.version_info.minor} (vtrlab)",
                language="python",
                name=KERNEL_NAME,
                interrupt_mode="signal",
                metadata={},
            )
        return self._kernel_spec


on_clean_up(kill_kernels)  # SIGINT/SIGTERM kill this process's kernels too
