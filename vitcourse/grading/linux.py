"""The Linux constants the sandbox passes to ``unshare``, ``mount``, ``prctl`` and seccomp, named once.

Values from the kernel's UAPI headers (the same on every architecture Python runs on). Imported inside
the sandbox: it imports nothing.
"""

# <linux/sched.h>: clone(2) and unshare(2) flags
CLONE_THREAD = 0x00010000
CLONE_NEWNS = 0x00020000  # a new mount namespace
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/mount.h>: mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

# <linux/prctl.h>: prctl(2) options
PR_SET_PDEATHSIG = 1  # the signal the process gets when its parent dies
PR_SET_DUMPABLE = 4  # a process that is not dumpable cannot write its own /proc/self/uid_map
