"""Which of a fork's three Python phases a process pays for, installed on first need.

``os.register_at_fork`` hooks cannot be removed, and every one installed costs each
fork a Python call and the copy-on-write page faults of the objects it touches
(docs/design.md, "What runs at a fork").  So ``import forkguard`` installs none,
and a registry installs a phase when the first registration that needs it arrives:

=====================================  ==========================================
registration                           phases
=====================================  ==========================================
C object, policy "reset"               none (the C core restores it)
C object, policy "hold"; the C API     C_HOLDS: an after_in_parent hook in C,
                                       which reports hold timeouts
Python object, policy "reset"          after_in_child
Python object, policy "hold"           all three
``at_fork()`` hooks                    the hooks' phases; ``before`` means all three
=====================================  ==========================================

A before-hook's state is popped by the parent and child phases, which is why
``before`` always comes with both.  Once installed, a phase stays; with nothing
registered any more it does only a few attribute reads.

C_HOLDS is apart from the parent phase because every extension that uses the C API
installs it (C code may register a hold at any time): the full parent phase touched
enough objects to cost each fork about 30 page faults in the parent; this one is a C
function object that reads the C core's count and runs no Python while it is 0.
When both are installed, whichever runs first with no Python hold of this fork left
to release takes the C core's count (so it is reported once, and never while a
Python hold a warning handler might wait on is still held).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from forkguard._registry import Registry

BEFORE, PARENT, CHILD, C_HOLDS = 1, 2, 4, 8
ALL = BEFORE | PARENT | CHILD


class Phases:
    """The phases installed for one registry."""

    __slots__ = ("_installed", "_registry")

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._installed = 0

    def need(self, phases: int) -> None:
        """Install what `phases` asks for and is not installed yet.  Called under the
        registry's lock, so two threads never install a phase twice;
        os.register_at_fork only appends to a list (it waits for nothing)."""
        if phases & BEFORE:
            phases = ALL
        missing = phases & ~self._installed
        registry = self._registry
        if not missing or not registry.backend.can_fork or not hasattr(os, "register_at_fork"):
            return
        # A C function object (csrc/forkguard_holds.c): Python only when a C hold
        # of this thread's fork timed out.  Made first: if that fails, nothing is in.
        c_holds = (
            registry.backend.c_holds_hook(registry.report_c_timeouts) if missing & C_HOLDS else None
        )
        # The child and parent phases go in first: a fork that starts while this
        # runs must not find a before-hook whose state nobody pops.
        if missing & CHILD:
            os.register_at_fork(after_in_child=registry.after_fork_in_child)
        if missing & PARENT:
            os.register_at_fork(after_in_parent=registry.after_fork_in_parent)
        if missing & C_HOLDS:
            os.register_at_fork(after_in_parent=c_holds)
        if missing & BEFORE:
            os.register_at_fork(before=registry.before_fork)
        self._installed |= missing

    @property
    def installed(self) -> int:
        return self._installed
