//! One CPU's run queue: the ready threads it will run, first in first out,
//! and the threads of that CPU that are blocked (sleeping or joining).
//!
//! A queue is only ever reached through [`RqGuard`] (its lock held, with
//! interrupts off), which publishes the queue's length when it is dropped,
//! so that other CPUs can choose a victim to steal from or the least loaded
//! CPU for a spawn without taking the lock (a hint: the decision is made
//! again under the lock).
//!
//! Invariant: a thread id is in at most one queue, at most once, and only
//! while its state is `Ready`.

use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicUsize, Ordering};

use super::MAX_THREADS;

/// The queue proper.
pub(super) struct RunQueue {
    ids: [u8; MAX_THREADS],
    len: usize,
    /// Threads of this CPU that sleep or wait in `join` (bit per slot):
    /// the tick scans them for sleepers due, `exit` for its joiners.
    pub blocked: u64,
}

const _: () = assert!(MAX_THREADS <= 64 && MAX_THREADS <= u8::MAX as usize);

impl RunQueue {
    const fn new() -> Self {
        RunQueue {
            ids: [0; MAX_THREADS],
            len: 0,
            blocked: 0,
        }
    }

    /// Ready threads queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Appends `t` (not already queued anywhere).
    pub fn push(&mut self, t: usize) {
        debug_assert!(!self.contains(t));
        if let Some(slot) = self.ids.get_mut(self.len) {
            *slot = t as u8;
            self.len += 1;
        } else {
            panic!("run queue overflow: thread {t} queued twice somewhere");
        }
    }

    /// Whether `t` is queued here.
    pub fn contains(&self, t: usize) -> bool {
        self.ids[..self.len].iter().any(|&i| usize::from(i) == t)
    }

    fn remove_at(&mut self, k: usize) -> usize {
        let t = usize::from(self.ids[k]);
        self.ids.copy_within(k + 1..self.len, k);
        self.len -= 1;
        t
    }

    /// Removes and returns the first queued thread (oldest first) for
    /// which `ok` holds.
    pub fn take_first(&mut self, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let k = (0..self.len).find(|&k| ok(usize::from(self.ids[k])))?;
        Some(self.remove_at(k))
    }

    /// Removes and returns the last queued thread (newest first) for which
    /// `ok` holds.
    pub fn take_last(&mut self, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let k = (0..self.len)
            .rev()
            .find(|&k| ok(usize::from(self.ids[k])))?;
        Some(self.remove_at(k))
    }
}

/// A CPU's queue behind its lock, and its published length.
pub(super) struct Rq {
    q: spin::Mutex<RunQueue>,
    queued: AtomicUsize,
}

impl Rq {
    pub const fn new() -> Self {
        Rq {
            q: spin::Mutex::new(RunQueue::new()),
            queued: AtomicUsize::new(0),
        }
    }

    /// Locks the queue. Interrupts must be off (the tick takes it; checked
    /// here and at the release, in every build, as for a thread descriptor).
    pub fn lock(&self) -> RqGuard<'_> {
        assert!(
            !crate::irq::enabled(),
            "run queue locked with interrupts on"
        );
        RqGuard {
            g: self.q.lock(),
            queued: &self.queued,
        }
    }

    /// The length at the last unlock (a hint).
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// A locked run queue; publishes the length when dropped.
pub(super) struct RqGuard<'a> {
    g: spin::MutexGuard<'a, RunQueue>,
    queued: &'a AtomicUsize,
}

impl Deref for RqGuard<'_> {
    type Target = RunQueue;
    fn deref(&self) -> &RunQueue {
        &self.g
    }
}

impl DerefMut for RqGuard<'_> {
    fn deref_mut(&mut self) -> &mut RunQueue {
        &mut self.g
    }
}

impl Drop for RqGuard<'_> {
    fn drop(&mut self) {
        // Before the lock is released (the fields drop after this).
        assert!(
            !crate::irq::enabled(),
            "run queue released with interrupts on"
        );
        self.queued.store(self.g.len, Ordering::Relaxed);
    }
}
