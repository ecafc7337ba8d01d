"""The embedded dev stack behind ``rekey dev up | down | status``.

Every component is a real server process bound to 127.0.0.1 whose data, log and pid file
live under the state directory (``settings.home``):

* ``home/<name>/``          data (Temporal SQLite file, OpenBao raft storage and config)
* ``home/logs/<name>.log``  stdout and stderr of the process
* ``home/run/<name>.json``  pid file: pid, command line, ports, start time

Processes run in their own session, so they outlive the ``rekey`` command that started
them; ``down`` stops exactly the processes named in the pid files after checking that the
pid still belongs to the command line we started (pids get reused).

Modules: ``component`` (what a component is, its status), ``components`` and ``openbao`` (the
servers), ``processes`` (spawning, pid files, stopping), ``stack`` (up/down/status),
``throttle`` (the stack's throttle profile, ``<home>/devstack.json``), ``errors``, ``files``.
Importing this package starts nothing.
"""

from rekey.devstack.component import Component, ComponentStatus
from rekey.devstack.components import (
    COMPONENTS,
    AzureKeyVaultServer,
    CodecServer,
    MotoServer,
    RekeyWorker,
    TemporalDevServer,
    ThrottleProxyServer,
)
from rekey.devstack.errors import BinaryMissing, ComponentFailed, DevStackError, PortInUse
from rekey.devstack.openbao import OpenBaoServer, openbao_client
from rekey.devstack.stack import down, status, up
from rekey.devstack.throttle import (
    PROFILE_NAMES,
    BadThrottleProfile,
    ThrottleChoice,
    choose,
    read_choice,
)

__all__ = [
    "COMPONENTS",
    "PROFILE_NAMES",
    "AzureKeyVaultServer",
    "BadThrottleProfile",
    "BinaryMissing",
    "CodecServer",
    "Component",
    "ComponentFailed",
    "ComponentStatus",
    "DevStackError",
    "MotoServer",
    "OpenBaoServer",
    "PortInUse",
    "RekeyWorker",
    "TemporalDevServer",
    "ThrottleChoice",
    "ThrottleProxyServer",
    "choose",
    "down",
    "openbao_client",
    "read_choice",
    "status",
    "up",
]
