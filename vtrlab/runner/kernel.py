"""The Jupyter kernel notebooks run in: always this environment's Python.

Kernel specs are looked up by name across user, environment and system directories, so a
`python3` spec in ~/.local/share/jupyter could silently run another interpreter. The runner
does not look any spec up: it starts `sys.executable -m ipykernel_launcher` directly, which
works the same in a fresh virtual environment.
"""

from __future__ import annotations

import os
import sys
import tempfile

from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager

KERNEL_NAME = "python3"  # what papermill records in the executed notebook


class VenvKernelManager(KernelManager):
    def __init__(self, **kwargs):
        # IPC sockets in a private directory instead of TCP ports: jupyter_client picks a free TCP
        # port by binding and releasing it, so kernels started in parallel (grid jobs) can race
        # for the same port and one dies with "Address already in use".
        kwargs.setdefault("transport", "ipc")
        kwargs.setdefault("ip", os.path.join(tempfile.mkdtemp(prefix="vtrlab-kernel-"), "kernel"))
        super().__init__(**kwargs)

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
                argv=[sys.executable, "-m", "ipykernel_launcher", "--IPKernelApp.log_level=CRITICAL",
                      "-f", "{connection_file}"],
                display_name=f"Python {sys.version_info.major}.{sys.version_info.minor} (vtrlab)",
                language="python",
                name=KERNEL_NAME,
                interrupt_mode="signal",
                metadata={},
            )
        return self._kernel_spec
