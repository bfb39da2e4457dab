"""The seccomp filter of the namespace sandboxes (pyseccomp; compiled once per process).

Default allow; ``EPERM`` for ``socket()`` of every family but ``AF_UNIX``, for namespace, mount, module, kexec,
bpf, perf, keyring, ptrace/``process_vm_*``, io_uring, clock, swap, reboot and file-handle syscalls (see
:data:`DENIED_SYSCALLS`), for ``clone`` with namespace flags, for ``personality`` changes and the ``TIOCSTI``
ioctl; ``ENOSYS`` for ``clone3`` (its flags cannot be inspected, libc falls back to ``clone``). Other
architectures' syscalls kill the process.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import socket
import tempfile

#: Syscalls that fail with EPERM inside the sandbox. Names unknown on this architecture are skipped.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "create_module",
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init", "lookup_dcookie",
    "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "reboot", "swapon", "swapoff", "acct", "syslog", "quotactl", "vhangup",
    "clock_settime", "clock_adjtime", "settimeofday", "adjtimex", "stime",
    "sethostname", "setdomainname", "iopl", "ioperm", "uselib", "nfsservctl", "vm86", "vm86old",
)  # fmt: skip
_CLONE_NAMESPACE_FLAGS = (
    0x00000080,  # CLONE_NEWTIME
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
_TIOCSTI = 0x5412
_PERSONALITY_QUERY = 0xFFFFFFFF


@functools.cache
def seccomp_bpf() -> bytes:
    """The compiled filter (classic BPF), as ``bwrap --seccomp`` reads it.

    Raises:
        ImportError: pyseccomp is not installed.
        OSError: libseccomp cannot build the filter.
    """
    import pyseccomp as sc

    filt = sc.SyscallFilter(sc.ALLOW)
    for name in DENIED_SYSCALLS:
        with contextlib.suppress(OSError):  # EINVAL: no such syscall on this architecture
            filt.add_rule(sc.ERRNO(errno.EPERM), name)
    filt.add_rule(sc.ERRNO(errno.EPERM), "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    filt.add_rule(sc.ERRNO(errno.EPERM), "personality", sc.Arg(0, sc.NE, _PERSONALITY_QUERY))
    filt.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
    for flag in _CLONE_NAMESPACE_FLAGS:
        filt.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    with contextlib.suppress(OSError):
        filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        filt.export_bpf(out)
        out.seek(0)
        return out.read()
