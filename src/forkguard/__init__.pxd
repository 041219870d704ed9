# `from forkguard cimport ...` finds the declarations in forkguard/forkguard.pxd.
from forkguard.forkguard cimport *
