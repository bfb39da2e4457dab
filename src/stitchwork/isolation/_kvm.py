"""Whether this host can boot KVM guests (shared by ``firecracker://`` and ``nanos://``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def kvm_usable() -> tuple[bool, str]:
    """``(True, "")`` when ``/dev/kvm`` is there, accessible and backed by hardware virtualisation.

    PVM (``kvm_pvm``, paravirtualised KVM inside a cloud VM) exposes ``/dev/kvm`` but has no ``vmx``/``svm``:
    stock guest kernels fail there (an MSR error, then an emulation failure), so it counts as unusable.
    """
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm (KVM is not available on this host)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    if Path("/sys/module/kvm_pvm").exists():
        return False, "KVM here is PVM (kvm_pvm module, no vmx/svm): stock guest kernels cannot boot"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if " vmx" not in flags and " svm" not in flags:
        return False, "the CPU exposes no vmx/svm flag: no hardware virtualisation for KVM guests"
    return True, ""


def kvm_and_binary(binary: str, missing: str) -> tuple[bool, str]:
    """:func:`kvm_usable`, then whether ``binary`` is on PATH (``missing`` says why it is not)."""
    ok, reason = kvm_usable()
    if not ok:
        return False, reason
    if shutil.which(binary) is None:
        return False, f"no {binary} binary on PATH ({missing})"
    return True, ""
