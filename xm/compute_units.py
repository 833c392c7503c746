"""Unit constants for resource quantities, so requirements read naturally.

`xm.JobRequirements(cpu=2 * xm.vCPU, ram=16 * xm.GiB)`; time units are for
walltimes (`walltime=2 * xm.Hr`).
"""

vCPU = 1.0  # one virtual CPU

# Binary (IEC) sizes in bytes.
KiB = 2**10
MiB = 2**20
GiB = 2**30
TiB = 2**40
PiB = 2**50

# Decimal (SI) sizes in bytes.
KB = 10**3
MB = 10**6
GB = 10**9
TB = 10**12
PB = 10**15

# Durations in seconds (lxm3 0.4.2 added these).
Sec = 1
Min = 60
Hr = 60 * 60
