//! The bookkeeping of temporary mappings as a balanced stack (a kernel's
//! `kmap_local`): the pure part, without hardware, tested on the host.
//!
//! A CPU owns a window of `N` slots; [`SlotStack`] is its stack: pushing
//! takes slot `top`, only the top may be popped, and each slot remembers
//! the context level that pushed it (thread, interrupt, nested exception:
//! the caller numbers them `0..LEVELS`). The stack keeps the depth of each
//! level now and its high-water mark. A thread's own kmaps are a second,
//! one-level [`SlotStack`] (its share of the window, saved across
//! switches); [`switch`] computes the slot changes a context switch makes
//! on a CPU. The kernel checks with [`SlotStack::check_push`] /
//! [`SlotStack::check_pop`] first, changes the hardware slot, then commits
//! with [`SlotStack::push`] / [`SlotStack::pop`], so a refused hardware
//! change leaves the books untouched.
//!
//! Invariant: `top <= N`; slots `0..top` hold the entries pushed and not
//! popped, in push order, at levels that never decrease from bottom to
//! top (contexts nest); slots `top..N` hold 0; `depth(l)` is the number
//! of slots below `top` pushed at level `l`, and `max_depth(l)` is the
//! largest value `depth(l)` ever had.

/// Context levels tracked: thread, interrupt, nested exception.
pub const LEVELS: usize = 3;

/// Why a push or pop was refused (nothing changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackError {
    /// The stack is full: `slot` would have been taken.
    Overflow {
        /// The slot that would have been taken.
        slot: usize,
    },
    /// A pop of a slot that is not the top.
    OutOfOrder {
        /// The slot released.
        slot: usize,
        /// Slots in use.
        top: usize,
    },
    /// A pop by another level than the push's.
    WrongContext {
        /// The slot released.
        slot: usize,
    },
    /// A push by a context below the one holding the top slot (a handler
    /// returned without releasing its slot): contexts nest, so the stack's
    /// levels never decrease from bottom to top.
    Nesting {
        /// The top slot, held by a higher level.
        slot: usize,
    },
    /// A level outside `0..LEVELS`.
    BadLevel(usize),
}

/// A stack of `N` slots (see the module invariant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotStack<const N: usize> {
    top: usize,
    entries: [u64; N],
    level: [u8; N],
    depth: [u32; LEVELS],
    max_depth: [u32; LEVELS],
}

impl<const N: usize> Default for SlotStack<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> SlotStack<N> {
    /// An empty stack.
    pub const fn new() -> Self {
        SlotStack {
            top: 0,
            entries: [0; N],
            level: [0; N],
            depth: [0; LEVELS],
            max_depth: [0; LEVELS],
        }
    }

    /// Slots in use.
    pub const fn top(&self) -> usize {
        self.top
    }

    /// The entry of `slot` (0 for a slot not in use or out of range).
    pub fn entry(&self, slot: usize) -> u64 {
        if slot < self.top {
            self.entries[slot]
        } else {
            0
        }
    }

    /// The entries in use, bottom first.
    pub fn entries(&self) -> &[u64] {
        &self.entries[..self.top]
    }

    /// The level that pushed `slot`, if it is in use.
    pub fn level_of(&self, slot: usize) -> Option<usize> {
        (slot < self.top).then(|| usize::from(self.level[slot]))
    }

    /// Slots in use per level.
    pub const fn depth(&self) -> [u32; LEVELS] {
        self.depth
    }

    /// The highest depth each level reached.
    pub const fn max_depth(&self) -> [u32; LEVELS] {
        self.max_depth
    }

    /// The slot a push at `level` would take.
    pub fn check_push(&self, level: usize) -> Result<usize, StackError> {
        if level >= LEVELS {
            return Err(StackError::BadLevel(level));
        }
        if self.top >= N {
            return Err(StackError::Overflow { slot: self.top });
        }
        if self.top > 0 && usize::from(self.level[self.top - 1]) > level {
            return Err(StackError::Nesting { slot: self.top - 1 });
        }
        Ok(self.top)
    }

    /// Pushes `entry` at `level`; returns its slot.
    pub fn push(&mut self, level: usize, entry: u64) -> Result<usize, StackError> {
        let slot = self.check_push(level)?;
        self.entries[slot] = entry;
        self.level[slot] = level as u8;
        self.top += 1;
        self.depth[level] += 1;
        self.max_depth[level] = self.max_depth[level].max(self.depth[level]);
        Ok(slot)
    }

    /// Whether `slot`, pushed at `level`, may be popped now.
    pub fn check_pop(&self, slot: usize, level: usize) -> Result<(), StackError> {
        if level >= LEVELS {
            return Err(StackError::BadLevel(level));
        }
        if slot + 1 != self.top {
            return Err(StackError::OutOfOrder {
                slot,
                top: self.top,
            });
        }
        if usize::from(self.level[slot]) != level {
            return Err(StackError::WrongContext { slot });
        }
        Ok(())
    }

    /// Pops `slot` (the top), pushed at `level`.
    pub fn pop(&mut self, slot: usize, level: usize) -> Result<(), StackError> {
        self.check_pop(slot, level)?;
        self.top -= 1;
        self.entries[slot] = 0;
        self.depth[level] -= 1;
        Ok(())
    }

    /// Replaces the whole stack by `entries`, all at level 0 (a thread's
    /// slots after a switch); the high-water marks keep counting.
    fn load_thread(&mut self, entries: &[u64]) {
        let n = entries.len().min(N);
        self.entries[..n].copy_from_slice(&entries[..n]);
        self.entries[n..].fill(0);
        self.level = [0; N];
        self.top = n;
        self.depth = [0; LEVELS];
        self.depth[0] = n as u32;
        self.max_depth[0] = self.max_depth[0].max(self.depth[0]);
    }
}

/// Whether the high-water marks of all levels fit a window of `slots`.
pub fn depths_fit(max_depth: [u32; LEVELS], slots: usize) -> bool {
    max_depth.iter().map(|&d| d as usize).sum::<usize>() <= slots
}

/// Why [`switch`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchError {
    /// The CPU's stack holds more than the outgoing thread's slots
    /// (handler slots across a switch): nothing was changed.
    Unbalanced {
        /// Slots in use on the CPU.
        top: usize,
        /// The outgoing thread's slots.
        thread: usize,
    },
}

/// What a switch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SwitchCount {
    /// Slots pointed at the incoming thread's entries.
    pub remapped: usize,
    /// The outgoing thread's slots (replaced or cleared).
    pub unmapped: usize,
}

/// A context switch on a CPU: its stack must hold exactly the outgoing
/// thread's slots (`from`); they are replaced by the incoming thread's
/// (`to`). `set(slot, entry)` is called once for every slot whose hardware
/// entry changes owner, in slot order (0 clears it). The books change
/// whatever `set` does (the caller counts its failures).
pub fn switch<const N: usize, const T: usize>(
    cpu: &mut SlotStack<N>,
    from: &SlotStack<T>,
    to: &SlotStack<T>,
    mut set: impl FnMut(usize, u64),
) -> Result<SwitchCount, SwitchError> {
    if cpu.top != from.top || cpu.depth[0] as usize != cpu.top {
        return Err(SwitchError::Unbalanced {
            top: cpu.top,
            thread: from.top,
        });
    }
    for slot in 0..from.top.max(to.top) {
        set(slot, to.entry(slot));
    }
    cpu.load_thread(to.entries());
    Ok(SwitchCount {
        remapped: to.top,
        unmapped: from.top,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn push_pop_lifo_and_depths() {
        let mut s = SlotStack::<4>::new();
        assert_eq!(s.push(0, 0x11), Ok(0));
        assert_eq!(s.push(1, 0x22), Ok(1));
        assert_eq!(s.push(0, 0x44), Err(StackError::Nesting { slot: 1 }));
        assert_eq!(s.push(2, 0x33), Ok(2));
        assert_eq!(s.depth(), [1, 1, 1]);
        assert_eq!(s.entries(), &[0x11, 0x22, 0x33]);
        assert_eq!(s.pop(1, 1), Err(StackError::OutOfOrder { slot: 1, top: 3 }));
        assert_eq!(s.pop(2, 0), Err(StackError::WrongContext { slot: 2 }));
        // Refusals changed nothing.
        assert_eq!(s.entries(), &[0x11, 0x22, 0x33]);
        assert_eq!(s.pop(2, 2), Ok(()));
        assert_eq!(s.entry(2), 0);
        assert_eq!(s.depth(), [1, 1, 0]);
        assert_eq!(s.max_depth(), [1, 1, 1]);
    }

    #[test]
    fn overflow_is_refused_not_wrapped() {
        let mut s = SlotStack::<2>::new();
        s.push(0, 1).unwrap();
        s.push(0, 2).unwrap();
        assert_eq!(s.push(0, 3), Err(StackError::Overflow { slot: 2 }));
        assert_eq!(s.entries(), &[1, 2]);
        assert_eq!(s.max_depth(), [2, 0, 0]);
        assert_eq!(s.check_push(LEVELS), Err(StackError::BadLevel(LEVELS)));
    }

    #[test]
    fn switch_replaces_the_threads_slots() {
        let mut cpu = SlotStack::<8>::new();
        let (mut a, mut b) = (SlotStack::<4>::new(), SlotStack::<4>::new());
        for e in [0xa1, 0xa2, 0xa3] {
            a.push(0, e).unwrap();
            cpu.push(0, e).unwrap();
        }
        b.push(0, 0xb1).unwrap();
        let mut sets = Vec::new();
        let n = switch(&mut cpu, &a, &b, |slot, e| sets.push((slot, e))).unwrap();
        assert_eq!(
            n,
            SwitchCount {
                remapped: 1,
                unmapped: 3
            }
        );
        assert_eq!(sets, [(0, 0xb1), (1, 0), (2, 0)]);
        assert_eq!(cpu.entries(), &[0xb1]);
        assert_eq!(cpu.depth(), [1, 0, 0]);
        // A handler's slot on the CPU: the switch refuses and changes nothing.
        cpu.push(1, 0x99).unwrap();
        let before = cpu.clone();
        let r = switch(&mut cpu, &b, &a, |_, _| panic!("no slot may change"));
        assert_eq!(r, Err(SwitchError::Unbalanced { top: 2, thread: 1 }));
        assert_eq!(cpu, before);
    }

    #[test]
    fn depths_fit_the_window() {
        assert!(depths_fit([16, 1, 1], 32));
        assert!(depths_fit([16, 8, 8], 32));
        assert!(!depths_fit([16, 8, 9], 32));
    }
}
