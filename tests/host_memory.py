"""Test helpers for ibp.memory: a registrar that records instead of calling
CUDA, and a process's memory as /proc/<pid>/smaps_rollup counts it."""
import os


class RecordingRegistrar:
    """Stands in for cudaHostRegister / cudaHostUnregister on a machine
    without a GPU; every call lands in ``calls`` (one list for all)."""
    calls = []

    def register(self, address, nbytes):
        self.calls.append(("register", address, nbytes))

    def unregister(self, address):
        self.calls.append(("unregister", address))


def smaps_kib(field, pid="self"):
    """One field of /proc/<pid>/smaps_rollup (Rss, Pss_Anon, ...) in KiB."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0])
    raise KeyError(field)


PAGE = os.sysconf("SC_PAGE_SIZE")
